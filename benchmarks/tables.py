#!/usr/bin/env python
"""Regenerate the tables of benchmarks/RESULTS.md from the records in benchmarks/measured/.

Each generated table sits between two marker comments that name its kind and its records
(file names or glob patterns, relative to this folder)::

    <!-- table: index measured/index-*.json -->
    ...generated...
    <!-- end table -->

Everything outside the markers is hand-written prose and is kept as it is. The numbers come
only from the records; the goals a table compares them with are written here.

    python benchmarks/tables.py            # rewrite RESULTS.md in place
    python benchmarks/tables.py --check    # exit 1 if RESULTS.md differs from its records
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
BLOCK = re.compile(
    r"(?P<open><!-- table: (?P<kind>[\w-]+)(?P<files>(?: [^ >]+)+) -->\n)"
    r"(?P<body>.*?)"
    r"(?P<close><!-- end table -->)",
    re.DOTALL,
)
Record = dict[str, Any]

#: How tables name the shapes the random models copy.
SHAPE_NAMES = {
    "qwen2.5-0.5b-instruct": "Qwen2.5-0.5B-Instruct",
    "llama-3.2-1b-instruct": "Llama-3.2-1B-Instruct",
}


def table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """A Markdown table; ``align`` gives each column's separator (``---`` or ``---:``)."""
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def sci(value: float) -> str:
    """``1.2287e-06`` -> ``1.23e-6``; ``0.001`` -> ``1e-3``."""
    mantissa, exponent = f"{value:.2e}".split("e")
    if float(mantissa).is_integer():
        mantissa = mantissa.split(".")[0]
    return f"{mantissa}e{int(exponent)}"


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def yes_no(met: bool) -> str:
    return "**yes**" if met else "**no**"


# --- one function per table kind: records -> Markdown ---------------------------------------


def adapter_nodes(records: list[Record]) -> str:
    (rec,) = records
    labels = {
        "no_nodes": "no adapter nodes",
        "nodes": "adapter nodes",
        "nodes_split_reads": f"adapter nodes + split ({rec['split_features']} features) + "
        f"reads ({rec['read_nodes']} nodes)",
    }
    # records of one engine (before --engines) name its variants plainly; later engines'
    # variants are "<variant>@<engine>"
    engines = rec.get("engines") or [None]
    n = len(rec["prompts"])
    rows = []
    for number, engine in enumerate(engines):
        for key, label in labels.items():
            name = key if number == 0 else f"{key}@{engine}"
            rows.append(
                ([engine] if engine else [])
                + [
                    label,
                    f"{rec['median_s'][name]:.3f}",
                    f"{rec['ratio_to_no_nodes'].get(name, 1.0):.2f}",
                    f"{rec['stored_bytes_median'][name] / 1e6:.1f}",
                ]
            )
    header = ["graph", f"median s per graph ({n} prompts)", "ratio to no nodes"]
    if engines != [None]:
        header = ["engine", *header[:2], "ratio to the engine's graph without nodes"]
    return table(header + ["stored MB (median)"], rows)


def training_throughput(records: list[Record]) -> str:
    (rec,) = records
    rows = []
    for i, stage in enumerate(rec["stages"]):
        rows.append(
            [
                f"{i + 1}{' (resumed)' if i else ''}",
                f"{stage['tokens_total']:,}",
                f"{stage['stage_seconds']:.1f}",
                f"{stage['stage_tokens_per_second']:,.0f}",
                f"{stage['steps_tokens_per_second']:,.0f}",
                f"{stage['max_fvu']:.3f}",
                f"{stage['mean_fvu']:.3f}",
                f"{mean(stage['dead_fraction']):.3f}",
                f"{stage['top1_agreement']:.3f}",
            ]
        )
    header = ["stage", "tokens in all", "stage seconds", "tokens/s (wall, with the checkpoint)"]
    header += ["tokens/s (steps only)", "max FVU", "mean FVU", "mean dead", "top-1 agreement"]
    return table(header, rows, ["---"] + ["---:"] * 8)


def optimizer_name(settings: dict[str, Any]) -> str:
    if settings["optimizer"] == "adam":
        return f"Adam {sci(settings['lr'])}, warm-up {settings['lr_warmup_steps']}"
    name = "sign-SGD" if settings["optimizer"].startswith("signum") else settings["optimizer"]
    if isinstance(settings["lr"], str):  # the records say sparsify chose it
        return f"{name}, sparsify's default rate"
    return f"{name} {sci(settings['lr'])}"


def training_optimizers(records: list[Record]) -> str:
    rows = []
    for rec in records:
        for stage in rec["stages"]:
            rows.append(
                [
                    optimizer_name(rec["settings"]),
                    f"{stage['tokens_total']:,}",
                    f"{stage['max_fvu']:.3f}",
                    f"{stage['mean_fvu']:.3f}",
                    f"{stage['fvu_per_layer'][0]:.3f}",
                    f"{mean(stage['dead_fraction']):.3f}",
                    f"{stage['top1_agreement']:.3f}",
                ]
            )
    rows_per_step = records[0]["settings"]["batch_size"]
    header = [f"optimizer ({rows_per_step} rows a step)", "tokens in all", "max FVU", "mean FVU"]
    header += ["layer 0 FVU", "mean dead", "top-1 agreement"]
    return table(header, rows, ["---"] + ["---:"] * 6)


def per_layer(values: list[float], digits: int) -> str:
    return ", ".join("0" if v == 0 else f"{v:.{digits}f}" for v in values)


def training_toy(records: list[Record]) -> str:
    (rec,) = records
    recipe, settings = rec["hand_written"]["recipe"], rec["sparsify"]["settings"]
    labels = {
        "hand_written": "hand-written (TopK, then JumpReLU thresholds and fine-tune; "
        f"{recipe['tc_features']} features, k {recipe['tc_k']})",
        "sparsify": f"sparsify ({settings['num_latents']} features, k {settings['k']}, "
        f"{optimizer_name(settings)}, {settings['epochs']} passes, "
        f"{rec['sparsify']['tokens'] / 1e6:.1f} M tokens)",
    }
    rows = []
    for key, label in labels.items():
        got, layers = rec[key], rec[key]["transcoders"]
        agree = got["replacement"]
        rows.append(
            [
                label,
                f"{got['train_seconds']:.1f}",
                per_layer([t["fvu"] for t in layers], 3),
                per_layer([t["mean_l0"] for t in layers], 1),
                per_layer([t["dead_fraction"] for t in layers], 2),
                " / ".join(
                    f"{agree[f'top1_agreement{part}']:.3f}" for part in ("", "_villain", "_adapted")
                ),
            ]
        )
    header = ["trainer", "train seconds", "FVU per layer", "mean L0 per layer"]
    header += ["dead per layer", "top-1 agreement base / villain / adapted"]
    return table(header, rows, ["---", "---:", "---", "---", "---", "---"])


def index_row(rec: Record) -> list[str]:
    workload = rec["workload"]
    if "layers" not in workload:
        per = rec["features"] // rec["layers"]
        workload += f" ({rec['layers']} layers x {per:,} features)"
    on_cpu = rec["device"] == "cpu"
    device = f"CPU, {rec['cpu_threads']} threads" if on_cpu else rec["device"]
    seconds = rec["seconds"]
    if rec["args"]["toy"]:  # goals of issue 17
        goal = f"under 60 s: {'met' if seconds < 60 else 'missed'}"
    else:
        tokens = rec["args"]["tokens"] / 1e6
        goal = f"{tokens:g} M tokens under 600 s: {'met' if seconds < 600 else 'missed'}"
    return [
        workload,
        device,
        f"{rec['documents']:,}",
        f"{rec['positions']:,}",
        f"{seconds:.1f}" if seconds < 100 else f"{seconds:.0f}",
        f"{rec['tokens_per_second']:,.0f}",
        goal,
    ]


def index(records: list[Record]) -> str:
    records = sorted(records, key=lambda r: (r["device"] != "cpu", r["date"]))
    header = ["workload", "device", "documents", "tokens", "seconds", "tokens/s", "goal"]
    align = ["---", "---", "---:", "---:", "---:", "---:", "---"]
    return table(header, [index_row(r) for r in records], align)


def pipeline(records: list[Record]) -> str:
    (rec,) = records
    stages = ["prompts", "logits", "labels", "graphs", "features", "report"]
    rows = []
    for shape, entry in rec["shapes"].items():
        for run, label in (("first_run", "from empty"), ("second_run", "all stored")):
            got = entry[run]
            cells = [f"{got['stage_seconds'].get(s, math.nan):.1f}" for s in stages]
            name = SHAPE_NAMES.get(shape, shape)
            rows.append([name, label, *cells, f"{got['wall_seconds']:.1f}"])
    header = ["shape", "run", *stages, "process wall"]
    return table(header, rows, ["---", "---"] + ["---:"] * 7)


def totals(records: list[Record]) -> str:
    """The totals-mode table (issue 14): the full run, then the one- and two-GPU stage runs."""
    full = next(r for r in records if "stage" in r)
    one, two = sorted((r for r in records if "processes" in r), key=lambda r: r["processes"])
    args, stage, fast, raw = full["args"], full["stage"], full["fast_stage"], full["raw"]
    exact, agree = full["exact"], full["agreement"]
    n, prompts = stage["n_pairs"], exact["prompts"]
    features = int(stage["n_active_features_median"])
    targets = prompts[0]["n_targets"]
    batches = math.ceil(features / args["batch_size"])
    speedup = one["seconds"] / two["seconds"]
    rows = [
        [
            f"prompt pairs per GPU-hour, whole graph stage in {args['dtype']} (`run_graph_stage` "
            f"over {n} pairs, both models resident: targets, same-pass logits, exact effects, "
            "compact save, meta; + the per-prompt analysis of each graph read back)",
            f"**{stage['pairs_per_gpu_hour']:,.0f}** ({stage['per_pair_s']:.3f} s per pair: "
            f"stage {stage['stage_s'] / n:.3f} s, analysis {stage['analysis_s'] / n:.3f} s)",
            ">= 5,000",
            yes_no(stage["pairs_per_gpu_hour"] >= 5000),
        ],
        [
            f"the same in {full['fast_dtype']} (both models and transcoders)",
            f"**{fast['pairs_per_gpu_hour']:,.0f}** ({fast['per_pair_s']:.3f} s per pair)",
            "moonshot 10,000",
            yes_no(fast["pairs_per_gpu_hour"] >= 10000),
        ],
        [
            f"ratio against two raw `attribute()` calls ({args['max_feature_nodes']:,} feature "
            f"nodes, batch {args['batch_size']}, its default salient targets; median of "
            f"{raw['n_pairs']} prompts after a warm-up: {raw['per_pair_s']:.2f} s per pair)",
            f"**{full['ratio']:.3f}** ({full['ratio_same_targets']:.3f} against `attribute()` "
            f"given our {targets} targets: {raw['same_targets_per_pair_s']:.2f} s)",
            "<= 0.1",
            f"{yes_no(full['ratio'] <= 0.1)}, covering all {features:,} active features "
            f"instead of {args['max_feature_nodes']:,}",
        ],
        [
            "exactness: totals vs `attribute(max_feature_nodes=None)` + the "
            f"activation-normalised solve (base model, {len(prompts)} prompts, {targets} targets)",
            f"relative error (Frobenius) total **{sci(exact['max_total_rel_err'])}**, direct "
            f"{sci(exact['max_direct_rel_err'])}; "
            f"{'same' if all(p['same_features'] for p in prompts) else 'different'} active "
            "features; totals differ from direct effects by "
            f"{max(p['total_vs_direct'] for p in prompts):.0%}",
            "<= 1e-5",
            yes_no(exact["max_total_rel_err"] <= 1e-5),
        ],
        [
            "time for those exact effects",
            f"{min(p['totals_s'] for p in prompts):.2f}-{max(p['totals_s'] for p in prompts):.2f}"
            f" s (totals) vs {mean([p['attribute_all_s'] for p in prompts]):.1f} s (`attribute()`"
            f" with every feature, {batches} backward batches) + "
            f"{mean([p['solve_s'] for p in prompts]):.2f} s (solve on the GPU)",
            "",
            "",
        ],
        [
            "working GPU memory per graph (peak minus resident before the call)",
            f"{stage['working_gib']:.2f} GiB {args['dtype']}, {fast['working_gib']:.2f} GiB "
            f"{full['fast_dtype']}",
            f"no higher than `attribute()`'s: {raw['working_gib']:.2f} GiB",
            yes_no(max(stage["working_gib"], fast["working_gib"]) <= raw["working_gib"]),
        ],
        [
            "peak GPU memory, whole stage, both models + one transcoder set resident",
            f"{stage['peak_gib']:.1f} GiB {args['dtype']} (resident {full['resident_gib']:.1f} "
            f"GiB), {fast['peak_gib']:.1f} GiB {full['fast_dtype']}",
            "",
            "",
        ],
        [
            f"{full['fast_dtype']} vs {args['dtype']}, top-{agree['top']} features by \\|total "
            f"effect\\| on the contrast, {agree['n_graphs'] // 2} prompts x 2 models",
            f"Jaccard median {agree['jaccard_median']:.2f} (min {agree['jaccard_min']:.2f}), "
            f"Spearman (signed, union of both tops) median {agree['spearman_median']:.3f} "
            f"(min {agree['spearman_min']:.3f})",
            "reported",
            "",
        ],
        [
            f"two GPUs: `accelerate launch`, 2 processes, {two['n_pairs']} pairs, models loaded "
            "and warmed up before the timed region, timed to the barrier after the stage",
            f"{one['seconds']:.1f} s on one GPU ({one['pairs_per_hour']:,.0f} pairs/h) -> "
            f"{two['seconds']:.1f} s on two ({two['pairs_per_hour']:,.0f} pairs/h): "
            f"**{speedup:.2f}x**",
            ">= 1.8x",
            yes_no(speedup >= 1.8) + (" (close)" if 0.95 * 1.8 <= speedup < 1.8 else ""),
        ],
    ]
    lines = ["| measurement | measured | goal | met |", "| --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


#: Issue 31's goals, pairs per GPU-hour for the whole graph stage, by mode and prompt tokens.
ENGINE_GOALS = {
    "float32": {24: 30_000, 128: 10_000, 512: 2_500},
    "tf32": {24: 50_000, 128: 20_000, 512: 5_000},
}


def _engine_cell(row: Record) -> str:
    if "error" in row:
        return "failed: " + row["error"].split(".")[0]
    return f"{row['pairs_per_gpu_hour']:,.0f}"


def engine(records: list[Record]) -> str:
    """The torch engine against the nnsight one (issue 31): one row per length and mode."""
    (rec,) = records
    rows = []
    by = {(r["tokens"], r.get("engine"), r.get("dtype")): r for r in rec["rows"]}
    for (tokens, name, dtype), row in sorted(by.items(), key=lambda kv: (kv[0][0], str(kv[0][1:]))):
        if name is None:
            rows.append([str(tokens), "-", "-", "failed: " + row["error"][:80], *[""] * 6])
            continue
        old = by.get((tokens, "nnsight", "float32"))
        ratio = ""
        if name != "nnsight" and old and "error" not in old and "error" not in row:
            ratio = f"{old['s_per_pair'] / row['s_per_pair']:.2f}x"
        goal = ENGINE_GOALS.get(dtype, {}).get(tokens) if name == "torch" else None
        met = "" if goal is None or "error" in row else yes_no(row["pairs_per_gpu_hour"] >= goal)
        err = row.get("rel_err_total")
        rows.append(
            [
                str(tokens),
                name,
                dtype,
                _engine_cell(row),
                "" if "error" in row else f"{row['s_per_pair']:.3f}",
                "" if "error" in row else f"{1000 * row['s_per_pair_per_token']:.2f}",
                ratio,
                "" if err is None else sci(err),
                "" if row.get("working_gib") is None else f"{row['working_gib']:.2f}",
                f"{goal:,} {met}" if goal else "",
            ]
        )
    header = [
        "tokens",
        "engine",
        "matmuls",
        "pairs per GPU-hour",
        "s per pair",
        "ms per pair per token",
        "vs nnsight",
        "rel. error vs nnsight",
        "working GiB",
        "goal met",
    ]
    out = table(header, rows, ["---:", "---", "---", *["---:"] * 6, "---"])
    agree = rec.get("fast_agreement")
    if agree:
        out += (
            f"\nTF32 vs IEEE float32 over {agree['graphs']} graphs of {agree['tokens']} tokens, "
            f"top-{agree['top']} features by |total effect| on the contrast: Jaccard median "
            f"{agree['jaccard_median']:.2f} (min {agree['jaccard_min']:.2f}), Spearman median "
            f"{agree['spearman_median']:.4f} (min {agree['spearman_min']:.4f}); device "
            f"{rec['device']}.\n"
        )
    return out


KINDS: dict[str, Callable[[list[Record]], str]] = {
    "engine": engine,
    "adapter-nodes": adapter_nodes,
    "training-throughput": training_throughput,
    "training-optimizers": training_optimizers,
    "training-toy": training_toy,
    "index": index,
    "pipeline": pipeline,
    "totals": totals,
}


def load_records(patterns: list[str], folder: Path) -> list[Record]:
    """The records a marker names, in the order named (a glob's matches sorted by name);
    smoke records and progress files are never tabulated."""
    records = []
    for pattern in patterns:
        paths = sorted(folder.glob(pattern))
        if not paths:
            raise FileNotFoundError(f"{folder / pattern}: no record matches this table's marker")
        for path in paths:
            record = json.loads(path.read_text())
            if not path.name.endswith("-progress.json") and not record.get("smoke"):
                records.append(record)
    return records


def render(text: str, folder: Path = HERE) -> str:
    """``text`` (RESULTS.md) with every marked table regenerated from its records."""

    def block(match: re.Match[str]) -> str:
        kind = match["kind"]
        if kind not in KINDS:
            raise ValueError(f"unknown table kind {kind!r} (known: {', '.join(KINDS)})")
        body = KINDS[kind](load_records(match["files"].split(), folder))
        return match["open"] + body + match["close"]

    return BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 on a change")
    args = parser.parse_args(argv)
    old = args.results.read_text()
    try:
        new = render(old, args.results.parent)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {args.results}: {err}", file=sys.stderr)
        return 2
    if new == old:
        return 0
    if args.check:
        print(
            f"error: {args.results}: tables differ from benchmarks/measured/*.json; run "
            "`python benchmarks/tables.py`",
            file=sys.stderr,
        )
        return 1
    args.results.write_text(new)
    print(f"rewrote the tables of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

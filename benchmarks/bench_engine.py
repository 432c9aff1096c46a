#!/usr/bin/env python
"""The torch totals engine (issue 31) against the nnsight one, at the lengths users run.

On the random Llama-3.2-1B-shaped workload of ``run_benchmarks.py`` (131,072-feature TopK
transcoders, k 64; 4 evil and 4 safe target ids plus their contrast: 9 targets), for each
``--lengths`` prompt length, with both models resident:

1. the whole graph stage per prompt pair (``run_graph_stage`` in totals mode: targets, the
   graph, storage, then the per-prompt analysis of every graph read back), on the torch
   engine in exact mode (IEEE float32, TF32 off) and in fast mode (TF32 matmuls), and on the
   nnsight engine (circuit-tracer's context) in the same run, for the ratio, adapter nodes
   off; and the default, adapter nodes on (the adapted model's graphs with their nodes,
   edges and reads), on both engines, at ``--default-length``. ``--runs`` picks some;
2. exactness: the torch engine's direct and total rows against the nnsight engine's (which
   equal circuit-tracer's ``attribute(max_feature_nodes=None)`` plus the linear solve; see
   tests/test_totals.py) on two prompts per length;
3. fast mode's agreement with exact mode over ``--agreement-graphs`` graphs: the top-50
   features by |total effect| on the contrast, Jaccard and Spearman.

Writes ``engine-<device>.json`` with ``rows`` (tokens, dtype, processes, pairs_per_gpu_hour,
s_per_pair, rel_err_total, working_gib, device, engine).

Examples::

    python benchmarks/bench_engine.py --max-seconds 480
    python benchmarks/bench_engine.py --smoke --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

import bench_totals
import harness  # the offline switches and the import path first
import run_benchmarks
import torch
from bench_totals import relative_error, specs_of, stage_throughput
from harness import Budget, Estimates, log, measure, median
from random_model import random_prompts
from sections.common import Settings
from sections.fast_dtype import spearman
from sections.setup import prepare
from workloads import random_workload_config

from em_circuits.attribution.attribute import prompt_ids, target_direction, target_rows
from em_circuits.attribution.engine import batched_effects
from em_circuits.attribution.stage import ResidentModels
from em_circuits.attribution.targets import PromptTargets
from em_circuits.attribution.totals import exact_effects
from em_circuits.core.store import ResultsStore

#: The measured configurations: engine and matmuls, adapter nodes off unless named.
RUNS = (
    "torch",
    "torch-tf32",
    "nnsight",
    "torch+adapter-nodes",
    "nnsight+adapter-nodes",
)

#: What ``--smoke`` sets: bench_totals.py's toy sizes, two lengths and a few graphs.
SMOKE: dict[str, Any] = {
    **bench_totals.SMOKE,
    "lengths": "24,64",
    "pairs": 2,
    "agreement_graphs": 4,
    "default_length": 24,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--lengths", default="24,128,512,2048", help="prompt tokens, incl. BOS")
    own.add_argument("--pairs", type=int, default=12, help="measured pairs per length (+1 warm-up)")
    own.add_argument("--long-pairs", type=int, default=4, help="pairs at 1,024 tokens and more")
    own.add_argument("--nnsight-max-length", type=int, default=512)
    own.add_argument("--agreement-graphs", type=int, default=64)
    own.add_argument("--agreement-length", type=int, default=128)
    own.add_argument("--default-length", type=int, default=128)
    own.add_argument(
        "--runs",
        default=",".join(RUNS),
        help=f"which of {', '.join(RUNS)} to measure (comma-separated)",
    )
    own.add_argument("--tag", default="", help="a tag in the record's file name")
    harness.add_record_options(own)
    mine, rest = own.parse_known_args(argv)
    args = run_benchmarks.parse_args(rest)
    for key, value in vars(mine).items():
        setattr(args, key, value)
    args.graph_mode = "totals"
    if args.smoke:
        vars(args).update(SMOKE)
    return args


def contrast_directions(model: Any, pt: PromptTargets) -> torch.Tensor:
    unembed = model.replacement.unembed_proj.detach()
    return torch.stack([target_direction(unembed, pt, row) for row in target_rows(model, pt, [])])


def exactness(model: Any, prompts: list[PromptTargets]) -> float:
    """The largest relative error of the torch engine's rows against the nnsight engine's."""
    worst = 0.0
    for pt in prompts:
        ids = prompt_ids(model, pt)
        directions = contrast_directions(model, pt)
        (got,) = batched_effects(model, [ids], [lambda _l, d=directions: d])
        want = exact_effects(model.replacement, ids, lambda _l, d=directions: d)
        worst = max(
            worst,
            relative_error(got.total, want.total),
            relative_error(got.direct, want.direct),
        )
    return worst


def top_agreement(exact: Any, fast: Any, top: int = 50) -> tuple[float, float]:
    """Top-``top`` features by |total effect| on the contrast (row 0): Jaccard, Spearman."""
    n = int(exact.features.shape[0])
    a, b = exact.total[0, :n], fast.total[0, :n]
    top_a = set(torch.argsort(a.abs(), descending=True)[:top].tolist())
    top_b = set(torch.argsort(b.abs(), descending=True)[:top].tolist())
    union = sorted(top_a | top_b)
    jaccard = len(top_a & top_b) / max(len(union), 1)
    return jaccard, spearman(a[union].tolist(), b[union].tolist())


def agreement(model: Any, prompts: list[PromptTargets]) -> dict[str, Any]:
    jaccards, spearmans = [], []
    for pt in prompts:
        ids = prompt_ids(model, pt)
        directions = contrast_directions(model, pt)
        pair = [
            batched_effects(model, [ids], [lambda _l, d=directions: d], precision=p)[0]
            for p in ("float32", "tf32")
        ]
        j, s = top_agreement(*pair)
        jaccards.append(j)
        spearmans.append(s)
    return {
        "graphs": len(prompts),
        "top": 50,
        "jaccard_median": median(jaccards),
        "jaccard_min": min(jaccards),
        "spearman_median": median(spearmans),
        "spearman_min": min(spearmans),
    }


def engine_profile(model: Any, prompts: list[PromptTargets], precision: str) -> dict[str, Any]:
    """Seconds per graph of the engine alone (no targets' forward pass, no storage): one
    prompt at a time, its frozen forward pass alone, and four prompts per batch."""
    from em_circuits.attribution.engine import linearised, matmul_precision
    from em_circuits.attribution.engine_model import frozen_forward

    ids = [prompt_ids(model, pt) for pt in prompts[:4]]
    fns = [lambda _l, d=contrast_directions(model, pt): d for pt in prompts[:4]]
    batched_effects(model, ids[:1], fns[:1], precision=precision)  # warm-up
    _, one = measure(
        lambda: [batched_effects(model, [i], [f], precision=precision) for i, f in zip(ids, fns)]
    )
    with matmul_precision(precision), torch.no_grad():
        _, fwd = measure(lambda: [frozen_forward(linearised(model), [i]) for i in ids])
    n = len(ids)
    out = {"graph_s": one.seconds / n, "forward_s": fwd.seconds / n, "working_gib": one.working_gib}
    if len(ids[0]) <= 512:  # four long prompts' patterns alone would take tens of GiB
        _, four = measure(lambda: batched_effects(model, ids, fns, precision=precision))
        out.update(batched_graph_s=four.seconds / n, batched_working_gib=four.working_gib)
    return out


def failing(fn: Any) -> dict[str, Any]:
    """``fn()``, or what went wrong (out of memory, say) with the memory it held, so that
    one length's failure leaves the others' numbers."""
    import traceback

    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - recorded, and the run goes on
        log(traceback.format_exc())
        out: dict[str, Any] = {"error": f"{type(err).__name__}: {err}"[:600]}
        out["where"] = traceback.format_exc().splitlines()[-12:]
        if torch.cuda.is_available():
            out["allocated_gib"] = torch.cuda.memory_allocated() / 2**30
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        harness.free_memory()
        return out


def measure_length(
    args: argparse.Namespace,
    settings: Settings,
    specs: dict[str, Any],
    resident: ResidentModels,
    tokens: int,
    budget: Budget,
) -> list[dict[str, Any]]:
    cfg = random_workload_config(args)
    pairs = args.pairs if tokens < 1024 else args.long_pairs
    prompts, _ = random_prompts(cfg, pairs + 1, 0, tokens, args.targets)
    store = ResultsStore(settings.workdir / f"results-engine-{tokens}")
    device = settings.device
    plain = replace(settings.params, adapter_nodes=False)
    every = {
        "torch": ("torch", "float32", plain),
        "torch-tf32": ("torch", "tf32", replace(plain, precision="tf32")),
        "nnsight": ("nnsight", "float32", replace(plain, engine="nnsight")),
        "torch+adapter-nodes": ("torch+adapter-nodes", "float32", settings.params),
        "nnsight+adapter-nodes": (
            "nnsight+adapter-nodes",
            "float32",
            replace(settings.params, engine="nnsight"),
        ),
    }
    wanted = args.runs.split(",")
    runs = []
    for name in wanted:
        if name.startswith("nnsight") and tokens > args.nnsight_max_length:
            continue
        if "adapter-nodes" in name and tokens != args.default_length:
            continue
        runs.append(every[name])
    exact = None
    if tokens <= args.nnsight_max_length and "torch" in wanted:
        found = failing(lambda: {"max": exactness(resident.get("base"), prompts[1:3])})
        exact = found.get("max")
        log(f"   {tokens} tokens: torch vs nnsight relative error {found}")
    profile: dict[str, Any] = {}
    if budget.left() > 90 and "torch" in wanted:
        for precision in ("float32", "tf32"):
            profile[precision] = failing(
                lambda p=precision: engine_profile(resident.get("base"), prompts[1:], p)
            )
        log(f"   {tokens} tokens, engine alone: {profile}")
    rows = []
    for engine, dtype, params in runs:
        if budget.left() < 60:
            log(f"   {tokens} tokens, {engine} {dtype}: skipped, out of time")
            continue
        stage = failing(
            lambda p=params: stage_throughput(store, specs, prompts, p, device, resident)
        )
        if "error" in stage:
            rows.append({"tokens": tokens, "dtype": dtype, "engine": engine, **stage})
            continue
        row = {
            "tokens": tokens,
            "dtype": dtype,
            "engine": engine,
            "processes": 1,
            "pairs_per_gpu_hour": stage["pairs_per_gpu_hour"],
            "s_per_pair": stage["per_pair_s"],
            "s_per_pair_per_token": stage["per_pair_s"] / tokens,
            "rel_err_total": exact if engine == "torch" and dtype == "float32" else None,
            "working_gib": stage["working_gib"],
            "peak_gib": stage["peak_gib"],
            "graph_s_median": stage["exact_effects_median_s"],
            "n_pairs": stage["n_pairs"],
            "n_active_features_median": stage["n_active_features_median"],
            "device": harness.device_name(device),
            "engine_alone": profile.get(dtype) if engine == "torch" else None,
        }
        log(
            f"   {tokens} tokens, {engine} {dtype}: {row['pairs_per_gpu_hour']:.0f} pairs/h, "
            f"{row['s_per_pair']:.3f} s per pair, working {row['working_gib']}"
        )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.from_args(args)
    budget = Budget(args.max_seconds)
    ctx = prepare(settings, budget, Estimates.initial(settings.device.type == "cuda"))
    specs = specs_of(ctx.workload, args.dtype)
    resident = ResidentModels(specs, settings.device, ctx.store.merged_cache_dir)
    resident.get("base"), resident.get("adapted")
    out: dict[str, Any] = {"workload": ctx.workload.description, "setup": ctx.workload.setup}
    rows: list[dict[str, Any]] = []
    try:
        for tokens in [int(n) for n in args.lengths.split(",")]:
            try:
                rows += measure_length(args, settings, specs, resident, tokens, budget)
            except Exception as err:  # noqa: BLE001 - the other lengths' rows are kept
                log(f"   {tokens} tokens failed: {type(err).__name__}: {err}")
                rows.append({"tokens": tokens, "error": f"{type(err).__name__}: {err}"[:600]})
                harness.free_memory()
        wanted = args.agreement_graphs > 0 and "torch-tf32" in args.runs.split(",")
        if wanted and budget.left() > 60:
            cfg = random_workload_config(args)
            prompts, _ = random_prompts(
                cfg, args.agreement_graphs, 0, args.agreement_length, args.targets
            )
            out["fast_agreement"] = {
                "tokens": args.agreement_length,
                **agreement(resident.get("base"), prompts),
            }
            log(f"   tf32 vs float32: {out['fast_agreement']}")
    finally:
        resident.release()
        out["rows"] = rows
        args.skip = sorted(getattr(args, "skip", []))
        harness.write_record(args, "engine", out, tag=args.tag)
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

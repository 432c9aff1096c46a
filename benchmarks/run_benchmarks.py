#!/usr/bin/env python
"""Benchmarks of the graph stage against raw circuit-tracer (issue 9), in one process.

Measures, on one workload and with warm-up first:

(a) our graph stage per prompt (base + adapted ``build_graph``: targets, logits, compact save;
    plus the per-prompt feature analysis) against two raw ``circuit_tracer.attribute()`` calls;
(b) the reload-the-models-per-prompt pattern against models loaded once;
(c) stored bytes per prompt (compact graphs) against dense ``Graph.to_pt`` files;
(d) per-graph feature analysis against ``circuit_tracer.graph.prune_graph`` on the same graph;
(e) batched next-token logits against a per-prompt loop;
then changes past circuit-tracer's defaults (bf16 attribution checked against float32, batch
size from measured memory, both models resident on one transcoder set), each with its predicted
and measured effect.

Workloads: ``llama1b-random`` (GPU; no downloads: a randomly initialised model of
Llama-3.2-1B's shape, a random LoRA adapter and random TopK transcoders, all written to
``--workdir``; sizes are flags so the same path runs tiny on a CPU) and ``toy`` (the embedded
toy organism, the CPU default). See benchmarks/README.md.

Output: a Markdown report on stdout, written to ``$OUT/RESULTS.md`` when OUT is set and to
``--output``; the raw numbers as JSON beside it (``results.json`` / ``--json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

# Offline before anything imports transformers or huggingface_hub: nothing is downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from harness import Budget, Estimates, SectionRunner, Skip, environment, log  # noqa: E402
from render import ReportInputs, render  # noqa: E402
from sections.analysis import analysis_vs_prune_graph  # noqa: E402
from sections.common import ANALYSIS_CALL, Context, ResidentModels, Settings  # noqa: E402
from sections.fast_dtype import FastDtypeResults, fast_dtype  # noqa: E402
from sections.graph_stage import graph_stage  # noqa: E402
from sections.logits import batched_logits  # noqa: E402
from sections.reload import reload_pattern  # noqa: E402
from sections.setup import load_resident, prepare  # noqa: E402
from workloads import LLAMA_3_2_1B, setup_estimate  # noqa: E402

from em_circuits.attribution.targets import AttributionParams  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workload",
        choices=["llama1b-random", "toy"],
        default="llama1b-random" if default_device == "cuda" else "toy",
    )
    parser.add_argument("--device", default=default_device)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=540.0,
        help="global budget; sections that do not fit are marked, not run",
    )
    parser.add_argument(
        "--workdir",
        default="/tmp/bench",
        help="where the workload's files, the results store and dense graphs go",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="delete this workload's folder first (no reuse of files or merges)",
    )
    parser.add_argument("--output", help="also write the Markdown report here")
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated sections to leave out: logits, graph, analysis, reload, fast",
    )
    g = parser.add_argument_group("attribution")
    g.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="main dtype (circuit-tracer's default is float32)",
    )
    g.add_argument("--fast-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    g.add_argument("--max-feature-nodes", type=int, default=8192)
    g.add_argument("--batch-size", type=int, default=AttributionParams.batch_size)
    g.add_argument("--batch-sizes", default="256,512,1024", help="the sweep, fast dtype")
    g.add_argument("--edge-keep", type=int, default=AttributionParams.edge_keep)
    g.add_argument("--top-features", type=int, default=50)
    g = parser.add_argument_group("how many")
    g.add_argument("--prompts", type=int, default=4, help="measured prompts of (a), + 1 warm-up")
    g.add_argument("--reload-prompts", type=int, default=2)
    g.add_argument("--analysis-graphs", type=int, default=2)
    g.add_argument("--dtype-prompts", type=int, default=3)
    g.add_argument("--sweep-prompts", type=int, default=2)
    g.add_argument("--logit-prompts", type=int, default=64)
    g.add_argument("--logit-batch", type=int, default=32)
    g.add_argument("--prompt-tokens", type=int, default=24, help="incl. BOS (llama1b-random)")
    g.add_argument("--targets", type=int, default=4, help="evil and safe target ids each")
    g = parser.add_argument_group("llama1b-random sizes (defaults: Llama-3.2-1B)")
    g.add_argument("--layers", type=int, default=LLAMA_3_2_1B["layers"])
    g.add_argument("--d-model", type=int, default=LLAMA_3_2_1B["d_model"])
    g.add_argument("--heads", type=int, default=LLAMA_3_2_1B["heads"])
    g.add_argument("--kv-heads", type=int, default=LLAMA_3_2_1B["kv_heads"])
    g.add_argument("--d-mlp", type=int, default=LLAMA_3_2_1B["d_mlp"])
    g.add_argument("--vocab", type=int, default=LLAMA_3_2_1B["vocab"])
    g.add_argument("--features", type=int, default=131072)
    g.add_argument("--k", type=int, default=64, help="TopK transcoders' k")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--transcoder-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    g.add_argument("--no-skip", action="store_true", help="transcoders without W_skip")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("toy")
    g.add_argument("--organism-dir", help="a built organism folder (default: the embedded one)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    return args


def run_sections(
    settings: Settings, runner: SectionRunner
) -> tuple[Context | None, dict[str, Any]]:
    """Every section in turn; the context (None if the setup failed) and the raw numbers."""
    args = settings.args
    estimates = Estimates.initial(
        args.workload == "llama1b-random" and settings.device.type == "cuda"
    )
    numbers: dict[str, Any] = {}
    resident = ResidentModels()
    reference_metas: dict[str, dict[str, Any]] = {}  # float32 base graphs of (a), by prompt
    fast_results = FastDtypeResults()

    ctx = runner.run(
        "setup",
        "setup: workload files, adapter merge",
        lambda: setup_estimate(args),
        lambda: prepare(settings, runner.budget, estimates),
    )

    def need_ctx() -> Context:
        if ctx is None:
            raise Skip("setup did not complete")
        return ctx

    def keep(key: str, value: dict[str, Any] | None) -> None:
        if value is not None:
            numbers[key] = value

    if ctx is not None:
        numbers["setup"] = ctx.workload.setup
    keep(
        "load",
        runner.run(
            "load",
            "load both models once on one transcoder set",
            lambda: 2 * estimates.load_s,
            lambda: load_resident(need_ctx(), resident),
        ),
    )
    keep(
        "e",
        runner.run(
            "logits",
            "(e) batched logits vs per-prompt loop",
            lambda: 10.0,
            lambda: batched_logits(need_ctx(), resident),
        ),
    )
    a_and_c = runner.run(
        "graph",
        "(a)+(c) our graph stage vs raw attribute(); bytes",
        lambda: 9 * estimates.graph_s + 5,
        lambda: graph_stage(need_ctx(), resident, reference_metas),
    )
    if a_and_c is not None:
        keep("a", a_and_c[0])
        keep("c", a_and_c[1])
    keep(
        "d",
        runner.run(
            "analysis",
            "(d) feature analysis vs prune_graph",
            lambda: 2 * estimates.graph_s + 10,
            lambda: analysis_vs_prune_graph(need_ctx(), resident),
        ),
    )
    keep(
        "b",
        runner.run(
            "reload",
            "(b) reload-the-models-per-prompt pattern",
            lambda: 2 * (estimates.load_s + estimates.graph_s) + 5,
            lambda: reload_pattern(need_ctx(), resident, numbers.get("a"), numbers.get("load")),
        ),
    )
    runner.run(
        "fast",
        f"past the defaults: {args.fast_dtype} attribution, batch-size sweep",
        lambda: estimates.load_s + 3 * estimates.graph_s,
        lambda: fast_dtype(need_ctx(), resident, reference_metas, fast_results),
    )
    numbers.update(fast_results.numbers())
    resident.release()
    return ctx, numbers


def output_paths(args: argparse.Namespace) -> list[tuple[Path | None, Path]]:
    """(report, numbers) paths to write: $OUT's, and --output's / --json's."""
    targets: list[tuple[Path | None, Path]] = []
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        targets.append((out / "RESULTS.md", out / "results.json"))
    if args.output:
        json_path = Path(args.json) if args.json else Path(args.output).with_suffix(".json")
        targets.append((Path(args.output), json_path))
    elif args.json:
        targets.append((None, Path(args.json)))
    return targets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
    )
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    settings = Settings.from_args(args)
    budget = Budget(args.max_seconds)
    env = environment()
    log(
        f"graph-stage benchmarks: {args.workload} on {env['device']}; budget "
        f"{args.max_seconds:.0f} s; workdir {settings.workdir}"
    )
    log(f"feature analysis: {ANALYSIS_CALL}")
    runner = SectionRunner(budget, args.skip)
    ctx, numbers = run_sections(settings, runner)
    workload = ctx.workload if ctx else None

    report = render(
        ReportInputs(
            args=args,
            env=env,
            workload=workload,
            params=settings.params,
            workdir=settings.workdir,
            elapsed_s=budget.elapsed(),
            analysis_call=ANALYSIS_CALL,
            sections=runner.records,
            numbers=numbers,
        )
    )
    results = {
        "environment": env,
        "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
        "workload": workload.description if workload else None,
        "analysis": ANALYSIS_CALL,
        "sections": runner.to_json(),
        "numbers": numbers,
        "total_s": budget.elapsed(),
    }
    blob = json.dumps(results, indent=1, default=str)
    for md_path, json_path in output_paths(args):
        if md_path is not None:
            md_path.parent.mkdir(parents=True, exist_ok=True)
            md_path.write_text(report)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(blob)
    log("\n" + report)
    return 1 if runner.failed() else 0


if __name__ == "__main__":
    sys.exit(main())

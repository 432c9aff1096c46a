#!/usr/bin/env python
"""Where does an adapted graph's time go once adapter nodes are on? The phases of one torch
engine graph (the frozen forward, which records the adapter's nodes; the main backward with
the nodes' scores; the edges-and-reads pass; building the graph), timed with device
synchronisation, on the workload of bench_adapter_nodes.py, then a cProfile of whole graphs
by own time.

    python benchmarks/profile_adapter_nodes.py --prompts 4
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from collections.abc import Callable
from statistics import median
from typing import Any

import bench_adapter_nodes
import harness  # the offline switches and the import path first

from em_circuits.attribution import engine, engine_adapter, totals_graph
from em_circuits.attribution.attribute import attribute_prompt
from em_circuits.attribution.targets import AttributionParams, PromptTargets

#: module, function name, phase: the functions timed (wrapped in place for this process)
PHASES = (
    (engine, "frozen_forward", "frozen forward (the adapter's nodes recorded in it)"),
    (engine_adapter, "carry", "backward carries (main + edges/reads)"),
    (engine_adapter, "_edges_and_reads", "edges and reads pass"),
    (totals_graph, "totals_graph", "graph record"),
)


def timed_phases(seconds: dict[str, list[float]]) -> None:
    for module, name, phase in PHASES:
        fn = getattr(module, name)

        def wrapper(*args: Any, _fn: Callable = fn, _phase: str = phase, **kwargs: Any) -> Any:
            harness.sync()
            start = time.perf_counter()
            out = _fn(*args, **kwargs)
            harness.sync()
            seconds.setdefault(_phase, []).append(time.perf_counter() - start)
            return out

        setattr(module, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    args = bench_adapter_nodes.parse_args(argv)
    model, _ = bench_adapter_nodes.adapted_model(args)
    ids = [5, 9, 11, 17]
    pts = [
        PromptTargets(
            f"p{i}",
            bench_adapter_nodes.prompt_text(model.tokenizer, i, args.sentences),
            ids[:2],
            ids[2:],
            {t: str(t) for t in ids},
            {"base": {}, "adapted": {}},
        )
        for i in range(args.prompts + 1)
    ]
    for label, params in (
        ("no nodes", AttributionParams(adapter_nodes=False)),
        ("defaults", AttributionParams()),
    ):
        attribute_prompt(model, pts[0], params)  # warm-up
        totals: list[float] = []
        seconds: dict[str, list[float]] = {}
        if label == "defaults":
            timed_phases(seconds)
        for pt in pts[1:]:
            harness.sync()
            start = time.perf_counter()
            attribute_prompt(model, pt, params)
            harness.sync()
            totals.append(time.perf_counter() - start)
        print(f"{label}: {median(totals):.4f} s per graph")
        for phase, values in seconds.items():
            per_graph = sum(values) / len(totals)
            print(f"   {phase}: {per_graph:.4f} s per graph ({len(values)} calls)")
    profiler = cProfile.Profile()
    profiler.enable()
    for pt in pts[1:]:
        attribute_prompt(model, pt, AttributionParams())
    harness.sync()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())

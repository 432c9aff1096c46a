#!/usr/bin/env python
"""Where does a totals-mode graph's time go? The steps of one exact-effects pass, timed with
device synchronisation, then a cProfile of the graph stage and of the per-prompt analysis.

Uses the workload of run_benchmarks.py (same flags), e.g. on a GPU:
  python benchmarks/profile_totals.py --prompts 4
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from collections.abc import Callable
from typing import Any

import bench_totals
import torch
from harness import Budget, Estimates, log, median, sync
from sections.common import Settings, analyse
from sections.setup import prepare

from em_circuits.attribution.attribute import target_direction, target_rows
from em_circuits.attribution.stage import ResidentModels, run_graph_stage
from em_circuits.attribution.stored_graphs import find_graph_metas, load_graph
from em_circuits.attribution.totals import TotalsBackward


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def profile(fn: Callable[[], Any], title: str, sort: str, lines: int = 30) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    sync()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats(sort).print_stats(lines)
    log(f"== cProfile {title} (by {sort})\n{out.getvalue()[:7000]}")


def main() -> None:
    args = bench_totals.parse_args(None)
    settings = Settings.from_args(args)
    ctx = prepare(
        settings, Budget(args.max_seconds), Estimates.initial(settings.device.type == "cuda")
    )
    specs = bench_totals.specs_of(ctx.workload, args.dtype)
    resident = ResidentModels(specs, settings.device, ctx.store.merged_cache_dir)
    model = resident.get("base")
    resident.get("adapted")
    rm = model.replacement
    steps: dict[str, list[float]] = {}
    for i, pt in enumerate(ctx.workload.prompts):
        ids = model.encode(pt.text)
        rows = target_rows(model, pt, [])
        unembed = rm.unembed_proj.detach()
        directions = torch.stack([target_direction(unembed, pt, row) for row in rows])
        attribution, t_setup = timed(lambda ids=ids: rm.setup_attribution(ids))
        _, t_forward = timed(
            lambda ids=ids, a=attribution, n=len(rows): rm.run_forward_pass(ids, 2 * n, a)
        )
        _, t_backward = timed(
            lambda a=attribution, d=directions: TotalsBackward(a, d.shape[0]).run(
                d.to(a.decoder_vecs.dtype)
            )
        )
        if i:
            for name, t in (("setup", t_setup), ("forward", t_forward), ("backward", t_backward)):
                steps.setdefault(name, []).append(t)
    for name, ts in steps.items():
        log(f"median {name}: {median(ts) * 1000:.1f} ms over {len(ts)}")
    store, params, device = ctx.store, settings.params, settings.device
    prompts = ctx.workload.prompts

    def stage() -> None:
        run_graph_stage(
            store, specs, prompts, params, device, force=True, progress=False, resident=resident
        )

    stage()  # warm-up
    _, seconds = timed(stage)
    log(f"stage: {seconds / len(prompts):.3f} s per pair over {len(prompts)}")
    profile(stage, "graph stage", "cumulative", 45)
    profile(stage, "graph stage", "tottime", 30)
    slug = bench_totals.slugs_of(specs, device)["base"]
    graph = load_graph(store, find_graph_metas(store, slug)[0])
    _, seconds = timed(lambda: analyse(graph))
    log(f"analysis: {seconds:.3f} s per graph")
    profile(lambda: analyse(graph), "analysis", "tottime", 20)
    resident.release()


if __name__ == "__main__":
    main()

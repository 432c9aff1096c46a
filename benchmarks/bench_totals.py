#!/usr/bin/env python
"""Totals mode (issue 14): the default graph stage against raw circuit-tracer, in one process.

On the same workload as ``run_benchmarks.py`` (see README.md), measures:

1. the whole graph stage per prompt pair with both models resident on one transcoder set
   (``run_graph_stage`` in totals mode: targets, same-pass logits, exact effects, storage;
   then the per-prompt analysis of each graph read back): pairs per GPU-hour, peak memory;
2. two raw ``circuit_tracer.attribute()`` calls per prompt (8,192 feature nodes, its default
   salient targets; and with our targets): the ratio, and their peak memory;
3. exactness on the GPU: totals against ``attribute(max_feature_nodes=None)`` (every active
   feature) followed by the activation-normalised linear solve;
4. the same stage with both models in ``--fast-dtype`` (bf16): pairs per GPU-hour, and its
   top features by total effect against the float32 graphs (Jaccard, Spearman).

With ``--stage-only`` it instead times the graph stage over ``--prompts`` prompts with the
models already loaded, in this process or in each process of an ``accelerate launch``; the
main process writes ``stage-<processes>gpu-<device>.json`` (the multi-GPU speed-up); otherwise
it writes ``totals-<device>.json`` (see harness.py). ``--smoke`` shrinks the random workload to
toy sizes and a few prompts (a CPU check).

Examples::

    python benchmarks/bench_totals.py --max-seconds 420            # sections 1-4, one GPU
    python benchmarks/bench_totals.py --stage-only --prompts 128   # one GPU
    accelerate launch --num_processes 2 benchmarks/bench_totals.py --stage-only --prompts 128
    python benchmarks/bench_totals.py --device cpu --layers 2 --d-model 128 --d-mlp 256 \\
        --vocab 1000 --features 4096 --k 16 --prompts 3 --exact-prompts 1   # CPU check
    python benchmarks/bench_totals.py --smoke --device cpu                 # smaller still
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import replace
from typing import Any

import harness  # the offline switches and the import path first
import run_benchmarks
import torch
from harness import Budget, Estimates, free_memory, log, measure, median
from sections.common import Settings, analyse
from sections.fast_dtype import feature_agreement
from sections.graph_stage import raw_attribute_calls
from sections.setup import prepare

from em_circuits.attribution.attribute import attribution_targets
from em_circuits.attribution.graph_build import build_graph
from em_circuits.attribution.stage import ResidentModels, model_identities, run_graph_stage
from em_circuits.attribution.storage import total_effects
from em_circuits.attribution.stored_graphs import find_graph_metas, load_graph
from em_circuits.attribution.targets import AttributionParams, PromptTargets
from em_circuits.attribution.totals import exact_effects
from em_circuits.core.distributed import current_shard
from em_circuits.core.store import ResultsStore


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--stage-only", action="store_true")
    own.add_argument("--raw-prompts", type=int, default=3, help="prompts given to attribute()")
    own.add_argument("--exact-prompts", type=int, default=2, help="prompts checked for exactness")
    harness.add_record_options(own)  # run_benchmarks' parser has --device and --dtype
    mine, rest = own.parse_known_args(argv)
    args = run_benchmarks.parse_args(rest)
    for key, value in vars(mine).items():
        setattr(args, key, value)
    args.graph_mode = "totals"  # run_benchmarks.py measures full graphs (issue 9)
    if args.smoke:
        vars(args).update(SMOKE)
    return args


#: What ``--smoke`` sets: the random workload at toy sizes, a warm-up and two prompts.
SMOKE: dict[str, Any] = {
    "workload": "llama1b-random",
    "layers": 2,
    "d_model": 64,
    "heads": 4,
    "kv_heads": 2,
    "d_mlp": 128,
    "vocab": 1000,
    "features": 1024,
    "k": 8,
    "prompts": 2,
    "logit_prompts": 2,
    "raw_prompts": 1,
    "exact_prompts": 1,
    "batch_size": 64,
}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm())


def specs_of(workload: Any, dtype: str) -> dict[str, Any]:
    adapted = replace(workload.adapted_spec, dtype=dtype)
    return {"base": adapted.base_only(), "adapted": adapted}


def slugs_of(specs: dict[str, Any], device: torch.device) -> dict[str, str]:
    return {role: slug for role, (slug, _) in model_identities(specs, device).items()}


def stage_throughput(
    store: ResultsStore,
    specs: dict[str, Any],
    prompts: list[PromptTargets],
    params: AttributionParams,
    device: torch.device,
    resident: ResidentModels,
) -> dict[str, Any]:
    """The graph stage over ``prompts[1:]`` after a warm-up on ``prompts[0]``, and the per-prompt
    analysis of every graph it wrote."""
    # force: graphs an earlier run stored in this workdir are computed again, not read back.
    run_graph_stage(
        store, specs, prompts[:1], params, device, force=True, progress=False, resident=resident
    )
    measured = prompts[1:]
    results, m = measure(
        lambda: run_graph_stage(
            store, specs, measured, params, device, force=True, progress=False, resident=resident
        )
    )
    failed = {role: r.failed for role, r in results.items() if r.failed}
    ids = {pt.prompt_id for pt in measured}
    metas = [
        meta
        for slug in slugs_of(specs, device).values()
        for meta in find_graph_metas(store, slug)
        if meta["prompt_id"] in ids
    ]
    _, analysis = measure(lambda: [analyse(load_graph(store, meta)) for meta in metas])
    seconds_per_pair = (m.seconds + analysis.seconds) / len(measured)
    graph_s = [float(meta["seconds"]) for meta in metas]
    return {
        "n_pairs": len(measured),
        "stage_s": m.seconds,
        "analysis_s": analysis.seconds,
        "per_pair_s": seconds_per_pair,
        "pairs_per_gpu_hour": 3600.0 / seconds_per_pair,
        "exact_effects_median_s": median(graph_s),
        "exact_effects_mean_s": sum(graph_s) / len(graph_s),
        "exact_effects_max_s": max(graph_s),
        "n_active_features_median": median([float(m["n_features_active"]) for m in metas]),
        "compact_bytes_median": median([float(m["files"]["compact_bytes"]) for m in metas]),
        "peak_gib": m.peak_gib,
        "working_gib": m.working_gib,
        "failed": failed,
    }


def raw_attribute(
    resident: ResidentModels, prompts: list[PromptTargets], params: AttributionParams
) -> dict[str, Any]:
    """Two ``attribute()`` calls per prompt (after a warm-up): default and with our targets."""
    rows: list[dict[str, Any]] = []
    for i, pt in enumerate(prompts):
        calls = raw_attribute_calls(
            [(role, resident.get(role)) for role in ("base", "adapted")], pt, params.full()
        )
        calls.pop("graphs")
        free_memory()
        row = {
            "default_s": calls["total_s"],
            "same_targets_s": calls["same_targets_total_s"],
            "working_gib": [
                *calls["working_gib"].values(),
                *calls["same_targets_working_gib"].values(),
            ],
        }
        log(
            f"   raw prompt {i}: {row['default_s']:.2f} s "
            f"(our targets {row['same_targets_s']:.2f} s)"
        )
        if i:  # the first prompt warms up
            rows.append(row)
    working = [w for r in rows for w in r["working_gib"] if w is not None]
    return {
        "n_pairs": len(rows),
        "per_pair_s": median([r["default_s"] for r in rows]),
        "same_targets_per_pair_s": median([r["same_targets_s"] for r in rows]),
        "working_gib": max(working) if working else None,
    }


def exactness(
    resident: ResidentModels, prompts: list[PromptTargets], params: AttributionParams
) -> dict[str, Any]:
    """Totals against every-feature ``attribute()`` plus the linear solve, base model."""
    from circuit_tracer import attribute

    from em_circuits.attribution.attribute import target_direction, target_rows

    model = resident.get("base")
    rm = model.replacement
    rows = []
    for pt in prompts:
        ids = model.encode(pt.text)
        targets = target_rows(model, pt, [])
        unembed = rm.unembed_proj.detach()
        directions = torch.stack([target_direction(unembed, pt, row) for row in targets])
        effects, m_totals = measure(
            lambda ids=ids, d=directions: exact_effects(rm, ids, lambda _: d)
        )
        _, custom = attribution_targets(model, pt, params.full(), "base", ids)
        graph, m_all = measure(
            lambda ids=ids, custom=custom: attribute(
                ids,
                rm,
                attribution_targets=custom,
                batch_size=params.batch_size,
                max_feature_nodes=None,
            )
        )
        n_features = int(graph.active_features.shape[0])
        n_sources = n_features + (graph.cfg.n_layers + 1) * graph.n_pos
        target_nodes = torch.arange(n_sources, n_sources + len(targets), device=model.device)
        adjacency = graph.adjacency_matrix.to(model.device)
        solve = functools.partial(
            total_effects,
            adjacency,
            n_features,
            n_sources,
            graph.activation_values.to(model.device),
            graph.cfg.n_layers,
            target_nodes,
        )
        total, m_solve = measure(solve)
        direct = adjacency[target_nodes, :n_sources]
        row = {
            "n_active_features": n_features,
            "n_targets": len(targets),
            "same_features": bool(torch.equal(graph.active_features.cpu(), effects.features.cpu())),
            "direct_rel_err": relative_error(effects.direct, direct),
            "total_rel_err": relative_error(effects.total, total),
            "total_vs_direct": relative_error(direct, total),
            "totals_s": m_totals.seconds,
            "attribute_all_s": m_all.seconds,
            "solve_s": m_solve.seconds,
            "totals_working_gib": m_totals.working_gib,
            "attribute_all_working_gib": m_all.working_gib,
        }
        rows.append(row)
        log(
            f"   exact {pt.prompt_id}: {n_features} features; relative error direct "
            f"{row['direct_rel_err']:.2e}, total {row['total_rel_err']:.2e}; totals "
            f"{row['totals_s']:.2f} s vs attribute(all) {row['attribute_all_s']:.1f} s + solve "
            f"{row['solve_s']:.2f} s"
        )
        del graph, adjacency
        free_memory()
    return {
        "prompts": rows,
        "max_total_rel_err": max(r["total_rel_err"] for r in rows),
        "max_direct_rel_err": max(r["direct_rel_err"] for r in rows),
    }


def dtype_agreement(
    store: ResultsStore,
    ref_slugs: dict[str, str],
    fast_slugs: dict[str, str],
    prompt_ids: list[str],
    top: int,
) -> dict[str, Any]:
    rows = []
    for role in ("base", "adapted"):
        ref = {m["prompt_id"]: m for m in find_graph_metas(store, ref_slugs[role])}
        fast = {m["prompt_id"]: m for m in find_graph_metas(store, fast_slugs[role])}
        for pid in prompt_ids:
            if pid in ref and pid in fast:
                agree = feature_agreement(
                    load_graph(store, ref[pid]), load_graph(store, fast[pid]), top
                )
                rows.append({"role": role, "prompt_id": pid, **agree})
    return {
        "top": top,
        "n_graphs": len(rows),
        "jaccard_median": median([r["jaccard"] for r in rows]),
        "jaccard_min": min(r["jaccard"] for r in rows),
        "spearman_median": median([r["spearman_signed"] for r in rows]),
        "spearman_min": min(r["spearman_signed"] for r in rows),
        "rows": rows,
    }


def full_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings.from_args(args)
    budget = Budget(args.max_seconds)
    ctx = prepare(settings, budget, Estimates.initial(settings.device.type == "cuda"))
    device, store, params = settings.device, ctx.store, settings.params
    prompts = ctx.workload.prompts
    out: dict[str, Any] = {"setup": ctx.workload.setup, "workload": ctx.workload.description}
    specs = specs_of(ctx.workload, args.dtype)
    resident = ResidentModels(specs, device, store.merged_cache_dir)
    _, m = measure(lambda: (resident.get("base"), resident.get("adapted")))
    out["load_s"], out["resident_gib"] = m.seconds, m.peak_gib
    log(f"1. graph stage, totals mode, {args.dtype}, {len(prompts) - 1} pairs")
    out["stage"] = stage_throughput(store, specs, prompts, params, device, resident)
    log(f"   {out['stage']['pairs_per_gpu_hour']:.0f} pairs per GPU-hour")
    log(f"2. raw attribute(), {args.raw_prompts} pairs + 1 warm-up")
    out["raw"] = raw_attribute(resident, prompts[: args.raw_prompts + 1], params)
    out["ratio"] = out["stage"]["per_pair_s"] / out["raw"]["per_pair_s"]
    out["ratio_same_targets"] = out["stage"]["per_pair_s"] / out["raw"]["same_targets_per_pair_s"]
    log(f"   ratio {out['ratio']:.3f} (same targets {out['ratio_same_targets']:.3f})")
    log(f"3. exactness on {args.exact_prompts} prompts")
    out["exact"] = exactness(resident, prompts[1 : 1 + args.exact_prompts], params)
    resident.release()
    log(f"4. graph stage in {args.fast_dtype}")
    fast_specs = specs_of(ctx.workload, args.fast_dtype)
    fast_resident = ResidentModels(fast_specs, device, store.merged_cache_dir)
    try:
        _, m = measure(lambda: (fast_resident.get("base"), fast_resident.get("adapted")))
        out["fast_load_s"], out["fast_resident_gib"] = m.seconds, m.peak_gib
        out["fast_stage"] = stage_throughput(
            store, fast_specs, prompts, params, device, fast_resident
        )
    finally:
        fast_resident.release()
    out["fast_dtype"] = args.fast_dtype
    log(f"   {out['fast_stage']['pairs_per_gpu_hour']:.0f} pairs per GPU-hour")
    out["agreement"] = dtype_agreement(
        store,
        slugs_of(specs, device),
        slugs_of(fast_specs, device),
        [pt.prompt_id for pt in prompts[1:]],
        args.top_features,
    )
    log(
        f"   top-{args.top_features} vs float32: Jaccard median "
        f"{out['agreement']['jaccard_median']:.2f}, Spearman median "
        f"{out['agreement']['spearman_median']:.3f}"
    )
    return out


def stage_only(args: argparse.Namespace) -> dict[str, Any] | None:
    """The graph stage over every prompt but the warm-up, models loaded first; timed from
    the barrier after loading to the one after the stage (every process's graphs done)."""
    shard = current_shard()
    if shard.count > 1 and torch.cuda.is_available():
        torch.cuda.set_device(shard.local_index)
    args.device = f"cuda:{shard.local_index}" if torch.cuda.is_available() else args.device
    settings = Settings.from_args(args)
    budget = Budget(args.max_seconds)
    if shard.is_main:  # writes the workload files and the merge once
        prepare(settings, budget, Estimates.initial(settings.device.type == "cuda"))
    shard.wait()
    ctx = prepare(settings, budget, Estimates.initial(settings.device.type == "cuda"))
    store = ResultsStore(settings.workdir / f"results-stage-{shard.count}")
    specs = specs_of(ctx.workload, args.dtype)
    resident = ResidentModels(specs, settings.device, ctx.store.merged_cache_dir)
    resident.get("base"), resident.get("adapted")
    params = settings.params
    prompts = ctx.workload.prompts
    # Every process warms up on the first prompt (a sharded stage would give it to one only).
    warm_store = ResultsStore(settings.workdir / f"results-warm-{shard.count}-{shard.index}")
    for role in specs:
        build_graph(warm_store, resident.get(role), role, prompts[0], params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    shard.wait()
    start = time.perf_counter()
    results = run_graph_stage(
        store,
        specs,
        prompts[1:],
        params,
        settings.device,
        force=True,
        progress=False,
        resident=resident,
    )
    seconds = time.perf_counter() - start  # run_graph_stage ends on a barrier
    resident.release()
    computed = sum(len(r.computed) for r in results.values())
    log(f"   process {shard.index}: {computed} graphs")
    if not shard.is_main:
        return None
    n_pairs = len(prompts) - 1
    return {
        "processes": shard.count,
        "n_pairs": n_pairs,
        "seconds": seconds,
        "pairs_per_hour": 3600.0 * n_pairs / seconds,
        "dtype": args.dtype,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage_only:
        result = stage_only(args)
        if result is None:
            return 0
        name = f"stage-{result['processes']}gpu"
    else:
        result = full_benchmark(args)
        name = "totals"
    args.skip = sorted(args.skip)  # a set is no JSON
    harness.write_record(args, name, result)
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Past circuit-tracer's defaults: attribution in a faster dtype, checked against (a)'s
float32 graphs, and the batch size chosen from measured memory."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from harness import GIB, Skip, cuda, free_memory, log, measure, median

from em_circuits.attribution.attribute import attribute_prompt
from em_circuits.attribution.storage import CompactGraph, load_compact
from em_circuits.attribution.targets import GraphError
from em_circuits.models.load import LoadedModel, load_model, release
from sections.common import Context, ResidentModels, model_weights_gib


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (no tie correction); NaN for fewer than 3 pairs."""
    if len(x) < 3:
        return math.nan
    rx = torch.tensor(x, dtype=torch.float64).argsort().argsort().double()
    ry = torch.tensor(y, dtype=torch.float64).argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom else math.nan


def contrast_effects(graph: CompactGraph) -> dict[tuple[int, ...], float]:
    """(layer, position, feature) -> total effect on the contrast target (row 0 if none)."""
    row = graph.contrast_index()
    row = 0 if row is None else row
    values = graph.total[row, : graph.n_features].double().tolist()
    keys = [tuple(int(v) for v in f) for f in graph.features.tolist()]
    return dict(zip(keys, values))


def feature_agreement(ref: CompactGraph, other: CompactGraph, top: int) -> dict[str, Any]:
    """Top features by |total effect| on the contrast target: overlap and rank agreement."""
    a, b = contrast_effects(ref), contrast_effects(other)
    top_a = sorted(a, key=lambda k: -abs(a[k]))[:top]
    top_b = sorted(b, key=lambda k: -abs(b[k]))[:top]
    union = set(top_a) | set(top_b)
    both = sorted(k for k in union if k in a and k in b)
    row_a = ref.contrast_index() or 0
    row_b = other.contrast_index() or 0
    value_a, value_b = float(ref.target_values[row_a]), float(other.target_values[row_b])
    return {
        "top": top,
        "jaccard": len(set(top_a) & set(top_b)) / max(len(union), 1),
        "spearman_signed": spearman([a[k] for k in both], [b[k] for k in both]),
        "n_ranked": len(both),
        "top1_same": bool(top_a and top_b and top_a[0] == top_b[0]),
        "contrast_value_ref": value_a,
        "contrast_value_other": value_b,
        "contrast_value_rel_diff": abs(value_a - value_b) / max(abs(value_a), 1e-12),
    }


@dataclass
class FastDtypeResults:
    """results.json's "fast_dtype" and "batch", kept as they are measured: a failure part-way
    still reports the budget notes and the batch sizes already swept."""

    fast_dtype: dict[str, Any] | None = None
    batch: dict[str, Any] | None = None

    def numbers(self) -> dict[str, Any]:
        pairs = (("fast_dtype", self.fast_dtype), ("batch", self.batch))
        return {key: value for key, value in pairs if value is not None}


def fast_dtype(
    ctx: Context,
    resident: ResidentModels,
    reference_metas: dict[str, dict[str, Any]],
    results: FastDtypeResults,
) -> None:
    """The base model reloaded in ``--fast-dtype`` (its transcoders too) attributes the
    prompts of (a) again; then the batch-size sweep on it. Fills ``results``."""
    if not reference_metas:
        raise Skip("needs the reference graphs of (a)")
    resident.release()
    args = ctx.args
    fast = args.fast_dtype
    spec = replace(ctx.workload.base_spec, dtype=fast)
    model, m_load = measure(lambda: load_model(spec, ctx.device, ctx.store.merged_cache_dir))
    notes: list[str] = []
    try:
        out: dict[str, Any] = {
            "dtype": fast,
            "load_s": m_load.seconds,
            "one_model_gib": model_weights_gib(model),
            "prompts": [],
        }
        ref_time = {pid: float(meta["seconds"]) for pid, meta in reference_metas.items()}
        pids = list(reference_metas)[: args.dtype_prompts]
        by_id = {pt.prompt_id: pt for pt in ctx.workload.prompts}
        attribute_prompt(model, by_id[pids[0]], ctx.params)  # warm-up
        for pid in pids:
            if out["prompts"] and not ctx.budget.allows(2 * ctx.estimates.graph_s, "bf16", notes):
                break
            (compact, _graph, info), m = measure(
                lambda pid=pid: attribute_prompt(model, by_id[pid], ctx.params)
            )
            # The file, not the remembered meta: later sections (the reload pattern) write the
            # same graph again, so the meta of (a) no longer matches the file's sha256.
            ref = load_compact(ctx.store.compact_graph_path(reference_metas[pid]))
            agree = feature_agreement(ref, compact, args.top_features)
            out["prompts"].append(
                {
                    "prompt_id": pid,
                    "attribute_s": info["seconds"],
                    "call_s": m.seconds,
                    "ref_attribute_s": ref_time.get(pid),
                    "working_gib": m.working_gib,
                    **agree,
                }
            )
            log(
                f"   {pid}: {fast} attribute() {info['seconds']:.2f} s vs float32 "
                f"{ref_time.get(pid, math.nan):.2f} s; top-{agree['top']} Jaccard "
                f"{agree['jaccard']:.2f}, Spearman {agree['spearman_signed']:.3f}"
            )
            del _graph
        rows = out["prompts"]
        if rows:
            out["attribute_s"] = median([r["attribute_s"] for r in rows])
            refs = [r["ref_attribute_s"] for r in rows if r["ref_attribute_s"] is not None]
            out["ref_attribute_s"] = median(refs)
            out["speedup"] = out["ref_attribute_s"] / out["attribute_s"]
            out["jaccard_min"] = min(r["jaccard"] for r in rows)
            out["jaccard_median"] = median([r["jaccard"] for r in rows])
            out["spearman_median"] = median([r["spearman_signed"] for r in rows])
            out["working_gib"] = max(
                (r["working_gib"] for r in rows if r["working_gib"] is not None), default=None
            )
        results.fast_dtype = out
        results.batch = {"dtype": str(model.dtype).removeprefix("torch."), "rows": []}
        batch_sweep(ctx, model, results.batch, notes)
    finally:
        release(model)
        free_memory()
        if results.fast_dtype is None:
            results.fast_dtype = {}
        results.fast_dtype["notes"] = notes


def batch_sweep(ctx: Context, model: LoadedModel, sweep: dict[str, Any], notes: list[str]) -> None:
    """attribute() at each ``--batch-sizes``: time and peak memory; into ``sweep``, with the
    fastest size whose peak fits in 80% of the GPU."""
    prompts = ctx.workload.prompts[1 : 1 + ctx.args.sweep_prompts]
    for bs in ctx.args.batch_sizes:
        need = (len(prompts) + 1) * ctx.estimates.graph_s + 5
        if not ctx.budget.allows(need, f"batch {bs}", notes):
            break
        params = replace(ctx.params, batch_size=bs)
        row: dict[str, Any] = {
            "batch_size": bs,
            "attribute_s": [],
            "peak_gib": [],
            "working_gib": [],
        }
        try:
            attribute_prompt(model, prompts[0], params)  # warm-up at this size
            for pt in prompts:
                (_c, _g, info), m = measure(
                    lambda pt=pt, params=params: attribute_prompt(model, pt, params)
                )
                row["attribute_s"].append(info["seconds"])
                row["peak_gib"].append(m.peak_gib)
                row["working_gib"].append(m.working_gib)
                del _g
            row["median_s"] = median(row["attribute_s"])
            row["max_peak_gib"] = max(row["peak_gib"]) if cuda() else None
            row["max_working_gib"] = max(row["working_gib"]) if cuda() else None
        except (GraphError, torch.cuda.OutOfMemoryError) as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        free_memory()
        sweep["rows"].append(row)
        log(
            f"   batch {bs}: "
            + (row.get("error") or f"{row['median_s']:.2f} s/graph, peak {row['max_peak_gib']} GiB")
        )
    ok = [r for r in sweep["rows"] if "median_s" in r]
    if ok:
        limit = 0.8 * torch.cuda.get_device_properties(0).total_memory / GIB if cuda() else math.inf
        fitting = [r for r in ok if (r["max_peak_gib"] or 0) <= limit] or ok
        best = min(fitting, key=lambda r: r["median_s"])
        sweep["best_batch_size"] = best["batch_size"]
        sweep["best_s"] = best["median_s"]
        sweep["memory_limit_gib"] = None if limit == math.inf else limit

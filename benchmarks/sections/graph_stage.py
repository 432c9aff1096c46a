"""(a) our graph stage against raw ``circuit_tracer.attribute()``, and (c) bytes per prompt."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from harness import Skip, log, measure, median

from em_circuits.attribution.attribute import attribution_targets
from em_circuits.attribution.graph_build import build_graph
from em_circuits.attribution.stored_graphs import load_graph
from em_circuits.attribution.targets import AttributionParams, PromptTargets
from em_circuits.models.load import LoadedModel
from sections.common import Context, ResidentModels, analyse


def ours_prompt(ctx: Context, resident: ResidentModels, pt: PromptTargets) -> dict[str, Any]:
    """Our graph stage for one prompt: both graphs built and saved, then analysed."""
    base, adapted = resident.pair()
    out: dict[str, Any] = {
        "build_s": {},
        "attribute_s": {},
        "analysis_s": {},
        "build_working_gib": {},
        "metas": {},
    }
    for role, model in (("base", base), ("adapted", adapted)):
        meta, m = measure(
            lambda model=model, role=role: build_graph(ctx.store, model, role, pt, ctx.params)
        )
        out["build_s"][role] = m.seconds
        out["attribute_s"][role] = float(meta["seconds"])
        out["build_working_gib"][role] = m.working_gib
        out["metas"][role] = meta
    for role, meta in out["metas"].items():
        _, m = measure(lambda meta=meta: analyse(load_graph(ctx.store, meta)))
        out["analysis_s"][role] = m.seconds
    out["total_s"] = sum(out["build_s"].values()) + sum(out["analysis_s"].values())
    out["compact_bytes"] = sum(
        int(meta["files"]["compact_bytes"]) for meta in out["metas"].values()
    )
    out["meta_bytes"] = sum(
        (ctx.store.graph_dir(meta["model_slug"], pt.prompt_id) / f"{meta['params_key']}.json")
        .stat()
        .st_size
        for meta in out["metas"].values()
    )
    return out


def raw_prompt(ctx: Context, resident: ResidentModels, pt: PromptTargets) -> dict[str, Any]:
    """Two plain circuit-tracer attribute() calls with default (salient) targets, and two
    with our stage's targets."""
    return raw_attribute_calls(zip(("base", "adapted"), resident.pair()), pt, ctx.params)


def raw_attribute_calls(
    models: Iterable[tuple[str, LoadedModel]], pt: PromptTargets, params: AttributionParams
) -> dict[str, Any]:
    """Per model, ``attribute()`` with its default (salient) targets and with the targets our
    stage uses (``params`` as for a full graph): times, memory, and the default call's graph."""
    from circuit_tracer import attribute

    out: dict[str, Any] = {
        "attribute_s": {},
        "peak_gib": {},
        "working_gib": {},
        "graphs": {},
        "same_targets_s": {},
        "same_targets_working_gib": {},
    }
    for role, model in models:
        ids = model.encode(pt.text)
        graph, m = measure(
            lambda model=model, ids=ids: attribute(
                ids,
                model.replacement,
                batch_size=params.batch_size,
                max_feature_nodes=params.max_feature_nodes,
            )
        )
        out["attribute_s"][role] = m.seconds
        out["peak_gib"][role] = m.peak_gib
        out["working_gib"][role] = m.working_gib
        out["graphs"][role] = graph
        # The same call with exactly the targets our stage uses: which features get
        # attributed (and so the backward cost) depends on the targets, not on our code.
        _, custom = attribution_targets(model, pt, params, role, ids)
        _, m = measure(
            lambda model=model, ids=ids, custom=custom: attribute(
                ids,
                model.replacement,
                attribution_targets=custom,
                batch_size=params.batch_size,
                max_feature_nodes=params.max_feature_nodes,
            )
        )
        out["same_targets_s"][role] = m.seconds
        out["same_targets_working_gib"][role] = m.working_gib
    out["total_s"] = sum(out["attribute_s"].values())
    out["same_targets_total_s"] = sum(out["same_targets_s"].values())
    return out


def dense_sizes(ctx: Context, graphs: dict[str, Any]) -> dict[str, Any]:
    """Bytes (and save time) of circuit-tracer's dense .pt files of one prompt's graphs."""
    folder = ctx.workdir / "dense"
    folder.mkdir(parents=True, exist_ok=True)
    sizes, seconds = {}, {}
    for role, graph in graphs.items():
        path = folder / f"{role}.pt"
        _, m = measure(lambda graph=graph, path=path: graph.to_pt(str(path)))
        sizes[role] = path.stat().st_size
        seconds[role] = m.seconds
        path.unlink()
    n_nodes = {role: int(g.adjacency_matrix.shape[0]) for role, g in graphs.items()}
    return {
        "dense_bytes_per_prompt": sum(sizes.values()),
        "dense_bytes": sizes,
        "dense_save_s": seconds,
        "dense_nodes": n_nodes,
    }


def graph_stage(
    ctx: Context, resident: ResidentModels, reference_metas: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(a)'s numbers, and (c)'s (None if no dense graph was measured).

    Prompt by prompt, ours and raw interleaved; the first prompt is a warm-up. The base
    model's graph meta of each measured prompt goes into ``reference_metas`` (by prompt id)
    as soon as it exists: the fast-dtype section checks its graphs against them, also when a
    later prompt of this section fails.
    """
    resident.pair()  # not resident: skip before any work
    notes: list[str] = []
    ours_runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    dense: dict[str, Any] = {}
    for i, pt in enumerate(ctx.workload.prompts):
        if i > 1 and not ctx.budget.allows(
            4.5 * ctx.estimates.graph_s + 2, f"(a) after {i - 1} prompts", notes
        ):
            break
        ours = ours_prompt(ctx, resident, pt)
        raw = raw_prompt(ctx, resident, pt)
        label = "warm-up" if i == 0 else f"prompt {i}"
        log(
            f"   {label}: ours {ours['total_s']:.2f} s (attribute() "
            f"{sum(ours['attribute_s'].values()):.2f} s), raw {raw['total_s']:.2f} s"
        )
        if i == 0:  # not counted; its (slower) graph time sizes the budget checks
            ctx.estimates.graph_s = median(list(ours["build_s"].values()))
            continue
        reference_metas[pt.prompt_id] = ours["metas"]["base"]
        if not dense:
            dense = dense_sizes(ctx, raw["graphs"])
        raw.pop("graphs")
        ours.pop("metas")
        ours_runs.append(ours)
        raw_runs.append(raw)
        ctx.estimates.graph_s = median([s for r in ours_runs for s in r["build_s"].values()])
    if not ours_runs:
        raise Skip("no prompt measured after the warm-up")
    return summarise(ours_runs, raw_runs, dense, notes)


def summarise(
    ours_runs: list[dict[str, Any]],
    raw_runs: list[dict[str, Any]],
    dense: dict[str, Any],
    notes: list[str],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Medians over the measured prompts: (a)'s numbers and (c)'s."""
    ours_total = median([r["total_s"] for r in ours_runs])
    raw_total = median([r["total_s"] for r in raw_runs])
    ours_attr = median([sum(r["attribute_s"].values()) for r in ours_runs])
    same_targets = median([r["same_targets_total_s"] for r in raw_runs])
    raw_peak = [p for r in raw_runs for p in r["peak_gib"].values() if p is not None]
    raw_working = [p for r in raw_runs for p in r["working_gib"].values() if p is not None]
    ours_working = [p for r in ours_runs for p in r["build_working_gib"].values() if p is not None]
    a = {
        "n_prompts": len(ours_runs),
        "ours_per_prompt_s": ours_total,
        "ours_attribute_per_prompt_s": ours_attr,
        "ours_analysis_per_prompt_s": median([sum(r["analysis_s"].values()) for r in ours_runs]),
        "ours_extras_per_prompt_s": ours_total - ours_attr,
        "ours_build_median_s": median([s for r in ours_runs for s in r["build_s"].values()]),
        "raw_per_prompt_s": raw_total,
        "raw_attribute_median_s": median([s for r in raw_runs for s in r["attribute_s"].values()]),
        "ratio": ours_total / raw_total,
        "raw_same_targets_per_prompt_s": same_targets,
        "ratio_same_targets": ours_total / same_targets,
        "raw_peak_gib_both_resident": max(raw_peak) if raw_peak else None,
        "raw_working_gib": max(raw_working) if raw_working else None,
        "ours_working_gib": max(ours_working) if ours_working else None,
        "prompts_per_hour": 3600.0 / ours_total,
        "per_prompt": {"ours": ours_runs, "raw": raw_runs},
        "notes": notes,
    }
    c = None
    if dense:
        compact = median([r["compact_bytes"] for r in ours_runs])
        meta = median([r["meta_bytes"] for r in ours_runs])
        c = {
            "compact_bytes_per_prompt": compact,
            "meta_bytes_per_prompt": meta,
            **dense,
            "ratio": dense["dense_bytes_per_prompt"] / (compact + meta),
        }
    log(
        f"   ours {ours_total:.2f} s/prompt vs raw {raw_total:.2f} s/prompt: ratio "
        f"{ours_total / raw_total:.3f}; vs raw with our targets {same_targets:.2f} s: ratio "
        f"{ours_total / same_targets:.3f}"
    )
    return a, c

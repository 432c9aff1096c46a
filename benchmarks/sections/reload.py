"""(b) The reload-the-models-per-prompt pattern against models loaded once."""

from __future__ import annotations

from typing import Any

from harness import Skip, cuda, log, measure, median

from em_circuits.attribution.graph_build import build_graph
from em_circuits.attribution.stored_graphs import load_graph
from em_circuits.attribution.targets import PromptTargets
from em_circuits.models.load import load_model, release
from sections.common import Context, ResidentModels, analyse


def reload_one_prompt(ctx: Context, pt: PromptTargets) -> dict[str, Any]:
    """Per model in turn: load it fresh (own transcoders), build the graph, release it; then
    the analysis of both graphs."""
    run: dict[str, Any] = {
        "load_s": {},
        "build_s": {},
        "release_s": {},
        "analysis_s": {},
        "peak_gib": {},
    }
    metas = {}
    for role, spec in (("base", ctx.workload.base_spec), ("adapted", ctx.workload.adapted_spec)):
        model, m_load = measure(
            lambda spec=spec: load_model(spec, ctx.device, ctx.store.merged_cache_dir)
        )
        meta, m_build = measure(
            lambda model=model, role=role: build_graph(ctx.store, model, role, pt, ctx.params)
        )
        _, m_rel = measure(lambda model=model: release(model))
        del model
        run["load_s"][role] = m_load.seconds
        run["build_s"][role] = m_build.seconds
        run["release_s"][role] = m_rel.seconds
        run["peak_gib"][role] = (
            max(v for v in (m_load.peak_gib, m_build.peak_gib) if v is not None) if cuda() else None
        )
        metas[role] = meta
    for role, meta in metas.items():
        _, m = measure(lambda meta=meta: analyse(load_graph(ctx.store, meta)))
        run["analysis_s"][role] = m.seconds
    run["total_s"] = sum(
        sum(run[k].values()) for k in ("load_s", "build_s", "release_s", "analysis_s")
    )
    return run


def reload_pattern(
    ctx: Context,
    resident: ResidentModels,
    graph_numbers: dict[str, Any] | None,
    load_numbers: dict[str, Any] | None,
) -> dict[str, Any]:
    """Releases the resident models, then measures the reload pattern. Given (a)'s and the
    resident load's numbers, compares it with ours at N prompts: (a)'s per-prompt time plus
    the one-off load amortised over N."""
    resident.release()
    notes: list[str] = []
    runs: list[dict[str, Any]] = []
    for pt in ctx.workload.prompts[1 : 1 + ctx.args.reload_prompts]:
        need = 2 * (ctx.estimates.load_s + ctx.estimates.graph_s) + 5
        if runs and not ctx.budget.allows(need, "(b)", notes):
            break
        run = reload_one_prompt(ctx, pt)
        runs.append(run)
        ctx.estimates.load_s = max(run["load_s"].values())
        log(
            f"   {pt.prompt_id}: {run['total_s']:.2f} s (loads {sum(run['load_s'].values()):.2f} s)"
        )
    if not runs:
        raise Skip("no prompt measured")
    reload = median([r["total_s"] for r in runs])
    load_pair = median([sum(r["load_s"].values()) for r in runs])
    out: dict[str, Any] = {
        "n_prompts": len(runs),
        "reload_per_prompt_s": reload,
        "load_pair_s": load_pair,
        "runs": runs,
        "notes": notes,
    }
    if graph_numbers and load_numbers:
        n_run = len(ctx.workload.prompts)
        out["by_n"] = {}
        for n in sorted({n_run, 100}):
            ours = graph_numbers["ours_per_prompt_s"] + load_numbers["total_s"] / n
            out["by_n"][str(n)] = {"ours_per_prompt_s": ours, "speedup": reload / ours}
        out["speedup_steady"] = reload / graph_numbers["ours_per_prompt_s"]
        out["n_run"] = n_run
    return out

"""(d) Our per-graph feature analysis against ``circuit_tracer.graph.prune_graph``."""

from __future__ import annotations

from typing import Any

from harness import Skip, cuda, free_memory, log, measure, median

from em_circuits.attribution.attribute import attribute_prompt
from em_circuits.attribution.storage import load_compact, save_compact
from em_circuits.attribution.storage_full import compact_from_dense
from sections.common import ANALYSIS_CALL, Context, ResidentModels, analyse


def analysis_vs_prune_graph(ctx: Context, resident: ResidentModels) -> dict[str, Any]:
    """Both on the same attribution of the base model: ours on its compact graph read back
    from disk, prune_graph on the Graph where attribute() leaves it (and on the GPU too)."""
    base, _ = resident.pair()
    from circuit_tracer.graph import prune_graph

    params = ctx.params
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    path = ctx.workdir / "analysis-probe.safetensors"
    for pt in ctx.workload.prompts[1 : 1 + ctx.args.analysis_graphs]:
        if rows and not ctx.budget.allows(2 * ctx.estimates.graph_s + 10, "(d)", notes):
            break
        (compact, graph, info), _ = measure(lambda pt=pt: attribute_prompt(base, pt, params))
        _, m_total = measure(
            lambda info=info: compact_from_dense(
                info["dense"], params.edge_keep, device=base.device
            )
        )
        save_compact(compact, path)
        _, m_an = measure(lambda: analyse(load_compact(path)))
        _, m_prune = measure(lambda graph=graph: prune_graph(graph))
        row = {
            "total_effects_s": m_total.seconds,
            "analysis_s": m_an.seconds,
            "prune_graph_s": m_prune.seconds,
            "adjacency_device": str(graph.adjacency_matrix.device),
            "n_nodes": int(graph.adjacency_matrix.shape[0]),
        }
        if cuda() and graph.adjacency_matrix.device.type == "cpu":
            graph.to(ctx.device)
            prune_graph(graph)  # warm the GPU kernels
            _, m_gpu = measure(lambda graph=graph: prune_graph(graph))
            row["prune_graph_gpu_s"] = m_gpu.seconds
        rows.append(row)
        log(
            f"   prune_graph {m_prune.seconds:.3f} s; ours: analysis {m_an.seconds:.3f} s, "
            f"total effects at graph time {m_total.seconds:.3f} s"
        )
        del graph, compact
        free_memory()
    path.unlink(missing_ok=True)
    if not rows:
        raise Skip("no graph analysed")
    analysis = median([r["analysis_s"] for r in rows])
    total = median([r["total_effects_s"] for r in rows])
    prune = median([r["prune_graph_s"] for r in rows])
    gpu = [r["prune_graph_gpu_s"] for r in rows if "prune_graph_gpu_s" in r]
    return {
        "n_graphs": len(rows),
        "analysis_s": analysis,
        "total_effects_s": total,
        "prune_graph_s": prune,
        "prune_graph_gpu_s": median(gpu) if gpu else None,
        "ratio_analysis": prune / analysis,
        "ratio_with_total_effects": prune / (analysis + total),
        "analysis": ANALYSIS_CALL,
        "rows": rows,
        "notes": notes,
    }

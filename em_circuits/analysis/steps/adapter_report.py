"""The report section on the adapter's own nodes (its step: analysis.steps.adapter_nodes)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from em_circuits.core.markdown import cell, fmt, md_table, with_feature_links
from em_circuits.core.report_data import StoredJson, TableRecord

_ADAPTER_QUANTITIES = {
    "adapter_total": "adapter nodes, total effect",
    "adapter_direct": "adapter nodes, direct effect",
    "via_downstream": "adapter nodes, through downstream nodes",
    "via_listed": "  of which first through the listed features",
    "via_adapter_nodes": "  of which first through other adapter nodes",
    "via_other": "  of which first through the other features",
    "shift": "measured shift of the contrast (adapted - base)",
}


@dataclass(frozen=True)
class AdapterNodes:
    """The report's entry on the adapter's own nodes (report.json ``adapter_nodes``)."""

    #: the step's entry of summary.json (its fields are the adapter analysis's)
    summary: StoredJson | None = None
    components: list[TableRecord] = field(default_factory=list)
    features: list[TableRecord] = field(default_factory=list)
    reads: list[TableRecord] = field(default_factory=list)
    #: the first rows of the positions and tokens tables, and their full row counts
    positions: list[TableRecord] = field(default_factory=list)
    tokens: list[TableRecord] = field(default_factory=list)
    where_rows: dict[str, int] = field(default_factory=dict)


def adapter_markdown(entry: AdapterNodes, analysis_rel: str) -> list[str]:
    """The adapter's own nodes: how much of the contrast their writes carry, directly and
    through features, and which components."""
    out = ["## The adapter's own nodes\n"]
    summary = entry.summary
    if not summary:
        return out + ["_no adapter nodes in these graphs (an analysis of older graphs)_\n"]
    if "none" in summary:
        reasons = "; ".join(
            cell(r.get("none", r)) if isinstance(r, Mapping) else cell(r) for r in summary["none"]
        )
        return out + [f"_none: {reasons}_\n"]
    out.append(
        "Each rank component of a LoRA on `down_proj`, `o_proj` or `v_proj` writes a fixed "
        "direction scaled by its activation at each position (`v_proj` through the frozen "
        "attention pattern); those writes are nodes of the adapted model's graphs, carved out "
        "of the MLP error nodes (`down_proj`) or out of the attention output (`o_proj`, "
        "`v_proj`; their activations read the residual stream linearly, so total effects pass "
        "through them as through features). A LoRA on `gate_proj` or `up_proj` acts through "
        "the MLP's nonlinearity: one node per position carries the measured change of the "
        "MLP output that module's update makes (not linear: such nodes need not add up to the "
        "joint change); a LoRA on `q_proj` or `k_proj` changes the attention pattern: one node "
        "per query position carries the change of the attention output that the pattern "
        "change makes through the base value and output weights (not linear either). Per "
        "prompt, on the evil-minus-safe contrast: the nodes' summed total "
        "effect, its direct part (straight to the logits) and the rest, which runs through "
        "the nodes downstream of the writes, split by the first node on each path: the "
        "features with the largest total effects on the contrast (the listed features), the "
        "read adapter nodes, and one remainder for the others; beside it the measured shift "
        "of the contrast from base to "
        "adapted. Cluster means, Student-t 95% intervals and sign-flip p-values over clusters, "
        "all prompts with adapter nodes (descriptive).\n"
    )
    rows = []
    for key, name in _ADAPTER_QUANTITIES.items():
        stats = summary.get(key) or {}
        if stats.get("n_prompts"):  # e.g. no attention node to pass effects on
            rows.append({"quantity": name, **stats})
    out.append(
        md_table(
            rows,
            ["quantity", "n_prompts", "n_clusters", "mean", "ci_low", "ci_high", "p", "p_method"],
        )
    )
    shares = [
        ("direct_share_of_total", "of the adapter nodes' total effect, directly"),
        ("via_downstream_share_of_total", "of it, through downstream nodes"),
        ("listed_share_of_via_downstream", "of that, first through the listed features"),
        ("adapter_total_share_of_shift", "the adapter nodes' total effect as a share of the shift"),
    ]
    said = [f"{fmt(summary[k])} {what}" for k, what in shares if summary.get(k) is not None]
    if said:
        out.append("Ratios of the means: " + "; ".join(said) + ".\n")
    if summary.get("not_nodes"):
        out.append(
            "Adapted modules that are not nodes (their effect stays in features, errors and "
            f"attention): {cell(summary['not_nodes'])}.\n"
        )
    out += _where_markdown(entry, analysis_rel)
    out.append(
        "Components ranked by their mean total effect on the discovery prompts, with the same "
        "mean on the validation prompts and their place among the adapted model's features by "
        "the same mean (`rank_among_features`, 1: above every feature); its mean activation at "
        "the last position, and `top_token`: the token where its effect on the contrast is "
        "largest most often (`top_token_count` prompts).\n"
    )
    components = entry.components
    out.append(
        md_table(
            components,
            [
                "component",
                "discovery_mean_total",
                "discovery_p",
                "discovery_clusters",
                "validation_mean_total",
                "validation_p",
                "validation_clusters",
                "rank_among_features",
                "mean_direct",
                "mean_activation_last",
                "top_token",
                "top_token_count",
                "n_prompts",
            ],
            limit=10,
            full=f"{analysis_rel}/adapter_components.csv",
        )
    )
    out += _carriers_markdown(entry.features, analysis_rel)
    out += _adapter_reads_markdown(summary, entry.reads, analysis_rel)
    return out


def _where_markdown(entry: AdapterNodes, analysis_rel: str) -> list[str]:
    """Where the LoRA's writes act on the contrast: positions and tokens ranked by effect."""
    positions, tokens = entry.positions, entry.tokens
    sizes = entry.where_rows
    if not positions and not tokens:
        return []
    return [
        "Where the LoRA writes, ranked by the writes' effect on the contrast (not by "
        "activation): the adapter nodes' total effect summed per position, mean over cluster "
        "means (0 where a prompt lacks the token), and its share of the nodes' total effect "
        "(the shares of all positions, or of all tokens, add up to 1); positions counted "
        "from the end (0: the last):\n",
        md_table(
            positions,
            ["from_end", "mean_effect", "share", "n_prompts", "n_clusters"],
            total=sizes.get("positions"),
            full=f"{analysis_rel}/adapter_positions.csv",
        ),
        md_table(
            [{**t, "token": repr(str(t.get("token")))} for t in tokens],
            ["token", "mean_effect", "share", "n_prompts", "n_clusters"],
            total=sizes.get("tokens"),
            full=f"{analysis_rel}/adapter_tokens.csv",
        ),
    ]


def _carriers_markdown(features: list[TableRecord], analysis_rel: str) -> list[str]:
    """Which features carry the adapter nodes' effect on to the logits."""
    out: list[str] = []
    if features:
        out.append(
            "Which features carry it: each feature's share of the adapter nodes' effect on the "
            "contrast (the nodes' summed edge into the feature's pre-activation times the "
            "contrast's total derivative with respect to the feature, summed over the "
            "feature's positions), ranked by the mean on the discovery prompts, with the same "
            "mean on the validation prompts. A prompt where the feature was not among the "
            "listed ones counts 0. `adapter`: whether the nodes' summed edge excites or "
            "inhibits the feature (mean over the prompts listing it).\n"
        )
        out.append(
            md_table(
                with_feature_links(features),
                [
                    "feature",
                    "discovery_mean_via",
                    "discovery_ci_low",
                    "discovery_ci_high",
                    "discovery_p",
                    "validation_mean_via",
                    "validation_p",
                    "validation_clusters",
                    "mean_edge",
                    "adapter",
                    "n_prompts_listed",
                ],
                limit=10,
                full=f"{analysis_rel}/adapter_features.csv",
            )
        )
    else:
        out.append(
            "_Which features carry it: not computed for these graphs (made with "
            "`--adapter-split-features 0`, or before the split existed)._\n"
        )
    return out


def _adapter_reads_markdown(
    summary: Mapping[str, Any], reads: list[TableRecord], analysis_rel: str
) -> list[str]:
    """What the adapter nodes read: the upstream features whose edges feed them."""
    total, from_features = summary.get("read_nodes_total"), summary.get("read_from_features")
    from_all = summary.get("read_from_all") or {}
    if not total or not total.get("n_prompts"):
        return [
            "_What the adapter reads: not computed for these graphs (made with "
            "`--adapter-read-nodes 0`, or before reads existed)._\n"
        ]
    if not reads:
        return [
            "What the adapter reads: the linear adapter nodes with the largest total effects on "
            "the contrast (their total effect, mean "
            f"{fmt(total.get('mean'))} over {total.get('n_clusters')} clusters) have no edge "
            "from any feature: they read only token embeddings, error nodes and other adapter "
            "nodes (as a layer-0 module does, below every feature); their edges from every "
            f"node add up to {fmt(from_all.get('mean'))}.\n"
        ]
    out = [
        "What the adapter reads: for the linear adapter nodes with the largest total effects "
        "on the contrast in each prompt, the edges from every upstream feature into the node's "
        "activation, times the node's total effect per unit activation: the part of those "
        "nodes' effect each feature sends through them. `o_proj` and `v_proj` activations are "
        "linear reads of the residual stream under the frozen attention; a `down_proj` "
        "activation reads the MLP's hidden state, so its edges are the gradient at the "
        "operating point (a linearisation). Edges from lower adapter nodes into them are not "
        "computed. "
        f"Those nodes' total effect, mean {fmt(total.get('mean'))} over "
        f"{total.get('n_clusters')} clusters; of it, read from features: "
        f"{fmt((from_features or {}).get('mean'))} "
        f"(95% CI {fmt((from_features or {}).get('ci_low'))} to "
        f"{fmt((from_features or {}).get('ci_high'))}); from every feature, error and token "
        f"node together: {fmt(from_all.get('mean'))}. Where that differs from the total "
        "effect, the reads do not add up to the activations: a linearisation through the MLP "
        "(`down_proj`: a gated MLP's hidden state is close to quadratic in its input, so such "
        "edges can add up to about twice the activation), edges from other adapter nodes, and "
        "biases make the difference, so "
        "read the table as which features feed the adapter and in which direction, not as "
        "an exact split. `feature_to_adapter`: whether the feature's summed edge raises or "
        "lowers the nodes' activations.\n",
        md_table(
            with_feature_links(reads),
            [
                "feature",
                "discovery_mean_via",
                "discovery_p",
                "validation_mean_via",
                "validation_p",
                "validation_clusters",
                "mean_edge",
                "feature_to_adapter",
                "n_prompts_listed",
            ],
            limit=10,
            full=f"{analysis_rel}/adapter_reads.csv",
        ),
    ]
    return out

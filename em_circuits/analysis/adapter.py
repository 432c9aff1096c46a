"""How much of the adapter's shift of the evil-minus-safe contrast goes through its own nodes.

Reads the adapted model's totals graphs that carry adapter nodes
(:mod:`em_circuits.attribution.adapter_nodes`). Per prompt, on the contrast target:

* the adapter nodes' summed total effect (everything the adapter's node writes do to the
  contrast in the linearised adapted model), split into their direct effect (straight to the
  logits, through frozen attention and skip connections) and the rest, which runs through the
  features downstream of the writes;
* that rest split by the first node it passes through: for each of the features with the
  largest total effects on the contrast, the adapter nodes' summed edge into the feature's
  pre-activation (positive: the adapter excites it; negative: inhibits it) times the
  contrast's total derivative with respect to the feature; through the read adapter nodes
  (``o_proj``, ``v_proj`` nodes downstream, which pass total effects on as features do);
  the nodes not listed get the remainder, shown as one row;
* what the adapter reads: for the linear adapter nodes with the largest total effects on the
  contrast, each upstream feature's edge into the node's activation times the node's total
  effect per unit activation, summed over those nodes: the part of their effect that the
  feature sends through them (for ``down_proj`` nodes the read passes the MLP's nonlinearity
  and is its gradient at the operating point, a linearisation);
* the contrast's measured shift, adapted minus base (from the two models' graphs), for scale:
  the adapter's nodes are one part of that shift (the adapter also changes which features
  fire, and writes through modules that are not nodes).

Across prompts these are cluster means with Student-t intervals and exact or Monte Carlo
sign-flip p-values over clusters. Each adapter component (layer, module, rank component; its
writes summed over positions) is ranked by its mean total effect on the discovery prompts and
its mean on the validation prompts is shown beside it, with the token where its effect on the
contrast is largest most often. Where the LoRA writes is ranked by the write's effect, not by
activation (a large activation can point where the write does little): the adapter nodes'
total effect on the contrast summed per position, then per position from the end and per
token across prompts (cluster means, 0 where a prompt lacks the token), each with its share of
the nodes' total effect (ratio of the means; the shares add up to 1). Each feature
(summed over its positions) is ranked the same way by the part of the adapter's effect it
carries; a prompt where the feature was not listed counts as 0 there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from em_circuits.attribution.storage import CompactGraph
from em_circuits.core.stats import cluster_rows, sign_flip_test, t_mean_ci

QUANTITIES = (
    "adapter_total",
    "adapter_direct",
    "via_downstream",
    "via_listed",
    "via_adapter_nodes",
    "via_other",
    "shift",
)


def _per_feature(
    prompt_id: str, adapted: CompactGraph, index: torch.Tensor, edge: torch.Tensor, via: Any
) -> list[dict[str, Any]]:
    """Rows (prompt, layer, feature) summed over the feature's positions, for the active
    features ``index`` with their ``edge`` and ``via`` values (one grouping pass: a read can
    list every upstream feature of a graph)."""
    pairs = adapted.features[index][:, [0, 2]]  # layer, feature id
    keys, group = torch.unique(pairs, dim=0, return_inverse=True)
    n = len(keys)
    edges = torch.zeros(n, dtype=torch.float64).index_add_(0, group, edge.double())
    vias = torch.zeros(n, dtype=torch.float64).index_add_(0, group, torch.as_tensor(via).double())
    counts = torch.bincount(group, minlength=n)
    return [
        {
            "prompt_id": prompt_id,
            "layer": int(layer),
            "feature": int(feature),
            "edge": float(e),
            "via": float(v),
            "positions": int(c),
        }
        for (layer, feature), e, v, c in zip(
            keys.tolist(), edges.tolist(), vias.tolist(), counts.tolist()
        )
    ]


def feature_rows(prompt_id: str, adapted: CompactGraph, contrast: int) -> list[dict[str, Any]]:
    """One row per listed feature (summed over its positions): the adapter nodes' summed
    edge into it and the part of their effect on the contrast that runs through it first."""
    if adapted.adapter_edge_sums is None or adapted.adapter_edge_features is None:
        return []
    index = adapted.adapter_edge_features.long()
    edge = adapted.adapter_edge_sums.double()
    derivative = adapted.total[contrast, index].double() / adapted.activations[index].double()
    return _per_feature(prompt_id, adapted, index, edge, edge * derivative)


def read_rows(prompt_id: str, adapted: CompactGraph) -> list[dict[str, Any]]:
    """One row per upstream feature with an edge into the read adapter nodes (summed over
    the feature's positions): its summed edge and the part of the nodes' effect on the
    contrast it sends through them."""
    if adapted.adapter_read_edges is None or adapted.adapter_read_via is None:
        return []
    edge, via = adapted.adapter_read_edges.double(), adapted.adapter_read_via.double()
    present = torch.nonzero(edge != 0).flatten()
    return _per_feature(prompt_id, adapted, present, edge[present], via[present])


def prompt_row(
    prompt_id: str, adapted: CompactGraph, base_value: float | None, decode: Any = None
) -> tuple[dict[str, Any], list[dict], list[dict], list[dict], list[dict]] | None:
    """(the prompt's row, one row per adapter component, one row per listed downstream
    feature, one row per upstream feature read, one row per position (:func:`position_rows`))
    on the contrast, or None when the graph has no contrast or no adapter nodes.
    ``base_value``: the base model's contrast value on the same prompt, if it has a graph."""
    c = adapted.contrast_index()
    if c is None or not adapted.n_adapter_nodes or adapted.adapter_total is None:
        return None
    assert adapted.adapter_direct is not None
    direct, total = adapted.adapter_direct[c].double(), adapted.adapter_total[c].double()
    value = float(adapted.target_values[c])
    row = {
        "prompt_id": prompt_id,
        "contrast_adapted": value,
        "contrast_base": base_value,
        "shift": value - base_value if base_value is not None else None,
        "adapter_total": float(total.sum()),
        "adapter_direct": float(direct.sum()),
        "via_downstream": float((total - direct).sum()),
        "n_adapter_nodes": adapted.n_adapter_nodes,
    }
    features = feature_rows(prompt_id, adapted, c)
    listed = sum(f["via"] for f in features) if adapted.adapter_edge_sums is not None else None
    row["via_listed"] = listed
    split = adapted.meta.get("adapter_split") or {}
    row["via_adapter_nodes"] = split.get("via_adapter_nodes")
    row["via_other"] = (
        row["via_downstream"] - listed - (row["via_adapter_nodes"] or 0.0)
        if listed is not None
        else None
    )
    row["n_listed_features"] = len(features)
    reads = read_rows(prompt_id, adapted)
    if adapted.adapter_read_nodes is not None:
        read = adapted.adapter_read_nodes.long()
        row["n_read_nodes"] = len(read)
        row["read_nodes_total"] = float(total[read].sum())
        row["read_from_features"] = float(sum(r["via"] for r in reads))
        row["read_from_all"] = split.get("read_from_all")
    components = _component_rows(prompt_id, adapted, direct, total, decode)
    return row, components, features, reads, position_rows(prompt_id, adapted, total, decode)


def position_rows(
    prompt_id: str, adapted: CompactGraph, total: torch.Tensor, decode: Any = None
) -> list[dict[str, Any]]:
    """One row per position with adapter nodes: their summed total effect on the contrast
    there (``effect``), the token and the position counted from the end (0: the last)."""
    positions = adapted.adapter_nodes[:, 3].long()
    effect = torch.zeros(adapted.n_pos, dtype=torch.float64).index_add_(0, positions, total)
    last = adapted.n_pos - 1
    rows = []
    for pos in torch.unique(positions).tolist():
        token = int(adapted.input_tokens[pos])
        rows.append(
            {
                "prompt_id": prompt_id,
                "position": pos,
                "from_end": last - pos,
                "token": decode([token]) if decode is not None else str(token),
                "effect": float(effect[pos]),
            }
        )
    return rows


def rank_where(positions: pd.DataFrame, clusters: Mapping[str, str], by: str) -> pd.DataFrame:
    """Where the adapter's writes act on the contrast, ``by`` "from_end" or "token": per
    value, the mean over prompts (cluster means; 0 where a prompt lacks it) of the adapter
    nodes' summed total effect there, its share of the mean total effect (the shares add
    up to 1), and the prompts it occurs in; largest magnitude first."""
    if positions.empty:
        return pd.DataFrame()
    per_prompt = positions.groupby([by, "prompt_id"])["effect"].sum().unstack(fill_value=0.0)
    prompts = [str(p) for p in per_prompt.columns]
    names = [clusters.get(p, p) for p in prompts]
    values = per_prompt.to_numpy(dtype=np.float64)
    rows, n_clusters = cluster_rows(values, np.ones_like(values, dtype=bool), names)
    means = np.array([row.mean() for row in rows])
    total = means.sum()
    table = pd.DataFrame(
        {
            by: per_prompt.index,
            "mean_effect": means,
            "share": means / total if total else np.nan,
            "n_prompts": (positions.groupby(by)["prompt_id"].nunique()).reindex(per_prompt.index),
            "n_clusters": n_clusters,
        }
    )
    order = np.argsort(-np.abs(means), kind="stable")
    return table.iloc[order].reset_index(drop=True)


def _component_rows(
    prompt_id: str, adapted: CompactGraph, direct: torch.Tensor, total: torch.Tensor, decode: Any
) -> list[dict[str, Any]]:
    """One row per adapter component (layer, module, rank component): its nodes' effects on
    the contrast summed over positions, its activation at the last position, and where its
    total effect on the contrast is largest in magnitude (the first such position). Grouped
    in one pass: an all-module rank-32 LoRA has hundreds of thousands of nodes."""
    modules = adapted.meta.get("adapter_modules") or []
    nodes = adapted.adapter_nodes.long()
    keys, group = torch.unique(nodes[:, :3], dim=0, return_inverse=True)
    n = len(keys)
    acts = adapted.adapter_activations.double()
    magnitude = total.abs()  # where the write acts on the contrast, not where it is large
    peak_magnitude = torch.zeros(n, dtype=torch.float64).scatter_reduce_(
        0, group, magnitude, reduce="amax", include_self=False
    )
    order = torch.arange(len(nodes))
    at_peak = magnitude == peak_magnitude[group]
    first_peak = torch.full((n,), len(nodes)).scatter_reduce_(
        0, group[at_peak], order[at_peak], reduce="amin", include_self=True
    )
    last = adapted.n_pos - 1
    at_last = nodes[:, 3] == last
    activation_last = torch.zeros(n, dtype=torch.float64).index_add_(
        0, group[at_last], acts[at_last]
    )
    totals = torch.zeros(n, dtype=torch.float64).index_add_(0, group, total)
    directs = torch.zeros(n, dtype=torch.float64).index_add_(0, group, direct)
    rows = []
    for k, (layer, module, comp) in enumerate(keys.tolist()):
        peak = int(nodes[first_peak[k], 3])
        token = int(adapted.input_tokens[peak])
        rows.append(
            {
                "prompt_id": prompt_id,
                "component": f"L{layer} {modules[module] if module < len(modules) else module}"
                f" #{comp}",
                "layer": layer,
                "total": float(totals[k]),
                "direct": float(directs[k]),
                "activation_last": float(activation_last[k]),
                "top_from_end": last - peak,
                "top_token": decode([token]) if decode is not None else str(token),
            }
        )
    return rows


def _cluster_stats(
    values: Mapping[str, float], clusters: Mapping[str, str], n_perm: int, seed: int
) -> dict[str, Any]:
    prompts = [p for p, v in values.items() if v is not None and np.isfinite(v)]
    if not prompts:
        return {"n_prompts": 0, "n_clusters": 0}
    vector = np.array([[values[p] for p in prompts]])
    rows, counts = cluster_rows(
        vector, np.ones_like(vector, dtype=bool), [clusters[p] for p in prompts]
    )
    low, high = t_mean_ci(rows)
    p, method = sign_flip_test(rows, n_perm=n_perm, seed=seed)
    return {
        "n_prompts": len(prompts),
        "n_clusters": int(counts[0]),
        "mean": float(rows[0].mean()),
        "ci_low": None if np.isnan(low[0]) else float(low[0]),
        "ci_high": None if np.isnan(high[0]) else float(high[0]),
        "p": float(p[0]),
        "p_method": str(method[0]),
    }


def summarize(
    rows: Sequence[dict[str, Any]],
    components: Sequence[dict[str, Any]],
    clusters: Mapping[str, str],
    discovery: set[str],
    n_perm: int = 9999,
    seed: int = 0,
    features: Sequence[dict[str, Any]] = (),
    reads: Sequence[dict[str, Any]] = (),
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(summary, per-prompt table, per-component table, per-feature table of the downstream
    features, per-feature table of the features read) across prompts."""
    prompts = pd.DataFrame(list(rows))
    summary: dict[str, Any] = {"n_prompts": len(prompts)}
    if prompts.empty:
        return summary, prompts, pd.DataFrame(), pd.DataFrame(), pd.DataFrame()
    for name in QUANTITIES:
        values = dict(zip(prompts["prompt_id"], prompts[name]))
        summary[name] = _cluster_stats(values, clusters, n_perm, seed)
    total = summary["adapter_total"].get("mean")
    direct = summary["adapter_direct"].get("mean")
    shift = summary["shift"].get("mean")
    if total:
        summary["direct_share_of_total"] = direct / total if direct is not None else None
        summary["via_downstream_share_of_total"] = (
            1 - direct / total if direct is not None else None
        )
    if shift:
        summary["adapter_total_share_of_shift"] = total / shift if total is not None else None
    via, listed = summary["via_downstream"].get("mean"), summary["via_listed"].get("mean")
    if via and listed is not None:
        summary["listed_share_of_via_downstream"] = listed / via
    for name in ("read_nodes_total", "read_from_features", "read_from_all"):
        if name in prompts:
            summary[name] = _cluster_stats(
                dict(zip(prompts["prompt_id"], prompts[name])), clusters, n_perm, seed
            )
    ids = list(prompts["prompt_id"])
    feature_table = _rank_features(
        pd.DataFrame(list(features)), ids, clusters, discovery, n_perm, seed
    )
    read_table = _rank_features(pd.DataFrame(list(reads)), ids, clusters, discovery, n_perm, seed)
    if len(read_table):
        read_table = read_table.rename(columns={"adapter": "feature_to_adapter"})
        read_table["feature_to_adapter"] = read_table["feature_to_adapter"].map(
            {"excites": "raises", "inhibits": "lowers"}
        )
    table = pd.DataFrame(list(components))
    if table.empty:
        return summary, prompts, table, feature_table, read_table
    out = []
    for name, group in table.groupby("component", sort=False):
        entry: dict[str, Any] = {"component": name, "layer": int(group["layer"].iloc[0])}
        on_discovery = group["prompt_id"].isin(discovery)
        for side, part in (
            ("discovery", group[on_discovery]),
            ("validation", group[~on_discovery]),
        ):
            stats = _cluster_stats(
                dict(zip(part["prompt_id"], part["total"])), clusters, n_perm, seed
            )
            entry[f"{side}_mean_total"] = stats.get("mean")
            entry[f"{side}_p"] = stats.get("p")
            entry[f"{side}_clusters"] = stats.get("n_clusters")
        entry["mean_direct"] = float(group["direct"].mean())
        entry["mean_activation_last"] = float(group["activation_last"].mean())
        tokens = Counter(group["top_token"])
        entry["top_token"], entry["top_token_count"] = tokens.most_common(1)[0]
        entry["n_prompts"] = len(group)
        out.append(entry)
    ranked = pd.DataFrame(out)
    order = _by_magnitude(ranked["discovery_mean_total"])
    return summary, prompts, ranked.loc[order].reset_index(drop=True), feature_table, read_table


def _rank_features(
    table: pd.DataFrame,
    prompt_ids: list[str],
    clusters: Mapping[str, str],
    discovery: set[str],
    n_perm: int,
    seed: int,
) -> pd.DataFrame:
    """Per feature: the part of the adapter's effect it carries, cluster means over the
    discovery and the validation prompts (0 where it was not listed), and its edge."""
    if table.empty:
        return table
    out = []
    for (layer, feature), group in table.groupby(["layer", "feature"], sort=False):
        via = dict(zip(group["prompt_id"], group["via"]))
        entry: dict[str, Any] = {"layer": int(layer), "feature": int(feature)}
        for side, chosen in (
            ("discovery", [p for p in prompt_ids if p in discovery]),
            ("validation", [p for p in prompt_ids if p not in discovery]),
        ):
            stats = _cluster_stats({p: via.get(p, 0.0) for p in chosen}, clusters, n_perm, seed)
            entry[f"{side}_mean_via"] = stats.get("mean")
            entry[f"{side}_ci_low"] = stats.get("ci_low")
            entry[f"{side}_ci_high"] = stats.get("ci_high")
            entry[f"{side}_p"] = stats.get("p")
            entry[f"{side}_clusters"] = stats.get("n_clusters")
        entry["mean_edge"] = float(group["edge"].mean())
        entry["adapter"] = "excites" if entry["mean_edge"] > 0 else "inhibits"
        entry["n_prompts_listed"] = len(group)
        out.append(entry)
    ranked = pd.DataFrame(out)
    return ranked.loc[_by_magnitude(ranked["discovery_mean_via"])].reset_index(drop=True)


def _by_magnitude(means: pd.Series) -> pd.Index:
    """Row order by |mean|, largest first, rows without a mean last. A side with no prompts
    (one graphed prompt: every prompt on the other side) gives a column of None, which is
    of object dtype and has no abs()."""
    return pd.to_numeric(means, errors="coerce").abs().fillna(-1).sort_values(ascending=False).index

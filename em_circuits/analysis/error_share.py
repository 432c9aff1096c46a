"""Who carries the contrast: features, error nodes, tokens and biases per layer."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from em_circuits.analysis.effects import contrast_rows
from em_circuits.attribution.storage import CompactGraph


def error_share(graph: CompactGraph) -> pd.DataFrame:
    """Decomposition of one prompt's contrast value into features, error nodes, tokens, bias.

    One row per group: ``error`` (one per layer), ``errors`` (all layers), ``tokens``,
    ``features`` and ``bias``; columns group, layer (-1 if not a layer), direct, total, value,
    direct_share, total_share (share = effect / contrast value). The direct column partitions
    the value exactly (features + errors + tokens + bias); the total column does for errors
    + tokens + bias (the roots), with bias the remainder (biases propagated through the
    features, and effects of active features not kept in the graph); the features' summed
    total effect is a flow through intermediate nodes, not additive with the roots.
    Raises ValueError when the graph has no contrast (no contrast target and no evil/safe pair).
    """
    rows = contrast_rows(graph)
    if rows is None:
        raise ValueError("graph has no contrast target and lacks an evil or a safe label")
    errors_direct = rows["direct"][graph.error_slice].reshape(graph.n_layers, graph.n_pos)
    errors_total = rows["total"][graph.error_slice].reshape(graph.n_layers, graph.n_pos)
    f = slice(0, graph.n_features)
    tokens_direct = rows["direct"][graph.token_slice].sum()
    tokens_total = rows["total"][graph.token_slice].sum()
    value = rows["value"]
    records = [
        {
            "group": "error",
            "layer": layer,
            "direct": errors_direct[layer].sum(),
            "total": errors_total[layer].sum(),
        }
        for layer in range(graph.n_layers)
    ]
    records += [
        {
            "group": "errors",
            "layer": -1,
            "direct": errors_direct.sum(),
            "total": errors_total.sum(),
        },
        {"group": "tokens", "layer": -1, "direct": tokens_direct, "total": tokens_total},
        {
            "group": "features",
            "layer": -1,
            "direct": rows["direct"][f].sum(),
            "total": rows["total"][f].sum(),
        },
        {
            "group": "bias",
            "layer": -1,
            "direct": value - rows["direct"][: graph.n_sources].sum(),
            "total": value - errors_total.sum() - tokens_total,
        },
    ]
    table = pd.DataFrame.from_records(records)
    table["value"] = value
    with np.errstate(divide="ignore", invalid="ignore"):
        table["direct_share"] = table["direct"] / value if value != 0 else np.nan
        table["total_share"] = table["total"] / value if value != 0 else np.nan
    return table


def summarize_error_share(
    base: Mapping[str, pd.DataFrame], adapted: Mapping[str, pd.DataFrame]
) -> pd.DataFrame:
    """Per group and layer: base and adapted means over prompts, and the paired shift.

    Inputs map prompt id -> :func:`error_share` table. Columns: group, layer, model (base,
    adapted, or delta), n_prompts, mean_total, mean_total_share, median_total_share,
    mean_direct, mean_direct_share. For model == "delta", the means are of the paired
    per-prompt differences adapted - base, and the "share" columns are pooled: sum of the
    effect's change over prompts / sum of the contrast value's change, i.e. the part of the
    adapter's shift of the contrast that this group carries (the prior art found it in the
    error nodes). Shares are noisy when a prompt's contrast value is near 0: read the medians.
    """
    frames = []
    for model, tables in (("base", base), ("adapted", adapted)):
        if tables:
            long = pd.concat(tables, names=["prompt_id"]).reset_index(level=0)
            frames.append(_share_means(long, model))
    paired = sorted(set(base) & set(adapted))
    if paired:
        frames.append(_share_delta(base, adapted, paired))
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def _share_means(long: pd.DataFrame, model: str) -> pd.DataFrame:
    grouped = long.groupby(["group", "layer"], sort=False)
    out = grouped.agg(
        n_prompts=("prompt_id", "nunique"),
        mean_total=("total", "mean"),
        mean_total_share=("total_share", "mean"),
        median_total_share=("total_share", "median"),
        mean_direct=("direct", "mean"),
        mean_direct_share=("direct_share", "mean"),
    ).reset_index()
    out.insert(2, "model", model)
    return out


def _share_delta(
    base: Mapping[str, pd.DataFrame], adapted: Mapping[str, pd.DataFrame], prompts: list[str]
) -> pd.DataFrame:
    key = ["group", "layer"]
    deltas = []
    for pid in prompts:
        merged = base[pid].merge(adapted[pid], on=key, suffixes=("_b", "_a"))
        merged["d_total"] = merged["total_a"] - merged["total_b"]
        merged["d_direct"] = merged["direct_a"] - merged["direct_b"]
        merged["d_value"] = merged["value_a"] - merged["value_b"]
        deltas.append(merged[key + ["d_total", "d_direct", "d_value"]])
    long = pd.concat(deltas, ignore_index=True)
    grouped = long.groupby(key, sort=False)
    sums = grouped[["d_total", "d_direct", "d_value"]].sum()
    out = grouped.agg(mean_total=("d_total", "mean"), mean_direct=("d_direct", "mean"))
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled_value = sums["d_value"].where(sums["d_value"] != 0)
        out["mean_total_share"] = sums["d_total"] / pooled_value
        out["mean_direct_share"] = sums["d_direct"] / pooled_value
    out["median_total_share"] = np.nan
    out["n_prompts"] = len(prompts)
    out = out.reset_index()
    out.insert(2, "model", "delta")
    return out

"""How much of the adapter's shift of the evil-minus-safe contrast goes through its own nodes.

Reads the adapted model's totals graphs that carry adapter nodes
(:mod:`em_circuits.attribution.adapter_nodes`). Per prompt, on the contrast target:

* the adapter nodes' summed total effect (everything the adapter's down_proj writes do to the
  contrast in the linearised adapted model), split into their direct effect (straight to the
  logits, through frozen attention and skip connections) and the rest, which runs through the
  features downstream of the writes;
* the contrast's measured shift, adapted minus base (from the two models' graphs), for scale:
  the adapter's nodes are one part of that shift (the adapter also changes which features
  fire, and writes through modules that are not nodes).

Across prompts these are cluster means with Student-t intervals and exact or Monte Carlo
sign-flip p-values over clusters. Each adapter component (layer, module, rank component; its
writes summed over positions) is ranked by its mean total effect on the discovery prompts and
its mean on the validation prompts is shown beside it. For each component the activation over
positions is its gate: where in the prompt the adapter writes, summarised as the mean
activation at the last position and the token where it is largest most often.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from em_circuits.attribution.storage import CompactGraph
from em_circuits.core.stats import cluster_rows, sign_flip_test, t_mean_ci

QUANTITIES = ("adapter_total", "adapter_direct", "via_features", "shift")


def prompt_row(
    prompt_id: str, adapted: CompactGraph, base_value: float | None, decode: Any = None
) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """(the prompt's row, one row per adapter component) on the contrast, or None when the
    graph has no contrast or no adapter nodes. ``base_value``: the base model's contrast
    value on the same prompt, if it has a graph."""
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
        "via_features": float((total - direct).sum()),
        "n_adapter_nodes": adapted.n_adapter_nodes,
    }
    modules = adapted.meta.get("adapter_modules") or []
    components = []
    nodes = adapted.adapter_nodes.tolist()
    keys = sorted({(layer, module, comp) for layer, module, comp, _ in nodes})
    last = adapted.n_pos - 1
    for key in keys:
        index = [i for i, node in enumerate(nodes) if tuple(node[:3]) == key]
        positions = [nodes[i][3] for i in index]
        acts = adapted.adapter_activations[index].double()
        peak = positions[int(acts.abs().argmax())]
        token = int(adapted.input_tokens[peak])
        layer, module, comp = key
        components.append(
            {
                "prompt_id": prompt_id,
                "component": f"L{layer} {modules[module] if module < len(modules) else module}"
                f" #{comp}",
                "layer": layer,
                "total": float(total[index].sum()),
                "direct": float(direct[index].sum()),
                "activation_last": float(acts[positions.index(last)]) if last in positions else 0.0,
                "peak_from_end": last - peak,
                "peak_token": decode([token]) if decode is not None else str(token),
            }
        )
    return row, components


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
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """(summary, per-prompt table, per-component table) across prompts."""
    prompts = pd.DataFrame(list(rows))
    summary: dict[str, Any] = {"n_prompts": len(prompts)}
    if prompts.empty:
        return summary, prompts, pd.DataFrame()
    for name in QUANTITIES:
        values = dict(zip(prompts["prompt_id"], prompts[name]))
        summary[name] = _cluster_stats(values, clusters, n_perm, seed)
    total = summary["adapter_total"].get("mean")
    direct = summary["adapter_direct"].get("mean")
    shift = summary["shift"].get("mean")
    if total:
        summary["direct_share_of_total"] = direct / total if direct is not None else None
        summary["via_features_share_of_total"] = 1 - direct / total if direct is not None else None
    if shift:
        summary["adapter_total_share_of_shift"] = total / shift if total is not None else None
    table = pd.DataFrame(list(components))
    if table.empty:
        return summary, prompts, table
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
        tokens = Counter(group["peak_token"])
        entry["peak_token"], entry["peak_count"] = tokens.most_common(1)[0]
        entry["n_prompts"] = len(group)
        out.append(entry)
    ranked = pd.DataFrame(out)
    order = ranked["discovery_mean_total"].abs().fillna(-1).sort_values(ascending=False).index
    return summary, prompts, ranked.loc[order].reset_index(drop=True)

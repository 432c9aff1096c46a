"""Where the adapter's shift of the contrast comes from: an exact signed decomposition.

A graph's direct effects partition its contrast value exactly: each feature, each error node
and each token embedding contributes its direct effect on the contrast, and the biases the
rest. Grouped by kind and layer (features of layer L; error nodes of layer L after the BOS
position; the error nodes at BOS, where circuit-tracer zeroes every feature so the whole
MLP output there is "error"; token embeddings; biases), the parts add up to the value. The
adapter's shift of the contrast, adapted minus base paired by prompt, is then the sum of the
parts' shifts, with no ratio that can exceed 1 or flip sign when a contrast is near 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from em_circuits.analysis.aggregate import cluster_statistics
from em_circuits.analysis.effects import contrast_rows
from em_circuits.attribution.storage import CompactGraph
from em_circuits.core.stats import cluster_rows

#: The row that holds the contrast value itself (the sum of every other row).
VALUE = "contrast value"


def contrast_parts(graph: CompactGraph) -> pd.DataFrame:
    """One prompt's contrast value as a sum of direct contributions.

    Rows: part (features, errors, bos_errors, tokens, bias, and ``contrast value``), layer
    (-1 when the part is not per layer), direct. Every row but the value sums to the value
    exactly. Raises ValueError when the graph has no contrast.
    """
    rows = contrast_rows(graph)
    if rows is None:
        raise ValueError("graph has no contrast target and lacks an evil or a safe label")
    direct = np.asarray(rows["direct"], dtype=np.float64)
    value = float(rows["value"])
    layers = graph.features[:, 0].numpy()
    features = direct[: graph.n_features]
    errors = direct[graph.error_slice].reshape(graph.n_layers, graph.n_pos)
    records = [
        {"part": "features", "layer": layer, "direct": float(features[layers == layer].sum())}
        for layer in range(graph.n_layers)
    ]
    records += [
        {"part": "errors", "layer": layer, "direct": float(errors[layer, 1:].sum())}
        for layer in range(graph.n_layers)
    ]
    records += [
        {"part": "bos_errors", "layer": -1, "direct": float(errors[:, 0].sum())},
        {"part": "tokens", "layer": -1, "direct": float(direct[graph.token_slice].sum())},
        {"part": "bias", "layer": -1, "direct": value - float(direct[: graph.n_sources].sum())},
        {"part": VALUE, "layer": -1, "direct": value},
    ]
    return pd.DataFrame.from_records(records)


def summarize_decomposition(
    base: Mapping[str, pd.DataFrame],
    adapted: Mapping[str, pd.DataFrame],
    clusters: Mapping[str, str] | None = None,
    n_perm: int = 9999,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Per part: base and adapted means and the adapter's shift, paired by prompt.

    Inputs map prompt id -> :func:`contrast_parts` table; only prompts with both are used.
    Columns: part, layer, n_prompts, n_clusters, mean_base, mean_adapted, mean_shift (mean
    over clusters of adapted - base), ci_low, ci_high (Student t over clusters), p_value,
    p_method. The parts' mean shifts add up to the ``contrast value`` row's mean shift
    exactly: it is a decomposition, not a share.
    """
    prompts = sorted(set(base) & set(adapted))
    if not prompts:
        return pd.DataFrame()
    key = ["part", "layer"]
    index = base[prompts[0]].set_index(key).index

    def matrix(tables: Mapping[str, pd.DataFrame]) -> np.ndarray:
        return np.stack(
            [tables[p].set_index(key)["direct"].reindex(index).to_numpy() for p in prompts],
            axis=1,
        )

    values_base, values_adapted = matrix(base), matrix(adapted)
    used = np.ones_like(values_base, dtype=bool)
    shift = cluster_statistics(
        values_adapted - values_base, used, prompts, clusters, n_perm, seed, alpha=alpha
    )
    table = index.to_frame(index=False)
    table["n_prompts"] = len(prompts)
    table["n_clusters"] = shift["n_clusters"]
    names = [clusters.get(p, p) if clusters else p for p in prompts]
    for column, values in (("mean_base", values_base), ("mean_adapted", values_adapted)):
        rows, _ = cluster_rows(values, used, names)
        table[column] = [row.mean() for row in rows]
    for column in ("mean", "ci_low", "ci_high", "p_value", "p_method"):
        table["mean_shift" if column == "mean" else column] = shift[column]
    return table

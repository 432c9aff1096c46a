"""Where the adapter's shift of the contrast comes from: an exact signed decomposition.

A graph's direct effects partition its contrast value exactly: each feature, each error node,
each adapter node and each token embedding contributes its direct effect on the contrast, and
the constants no node carries the rest. Grouped by kind and layer (features of layer L; error
nodes of layer L after the BOS position; the adapter nodes of layer L, the LoRA's own writes
(0 in graphs without them, e.g. the base model's); the MLP output of layer L at BOS; the error
nodes at BOS; token embeddings; and the biases), the parts add up to the value.
circuit-tracer zeroes every feature and error node at BOS, so the ``bos_errors`` row is 0 for
its graphs and what the MLP writes there (less the transcoder's skip connection, which is
linear and credited to the nodes below) is a constant the graph stores per layer
(``CompactGraph.bos_mlp``): the ``bos_mlp`` rows. What is left, ``biases``, is the
transcoders' decoder biases after BOS (and any bias of the model's own layers). Graphs stored
without ``bos_mlp`` (graph format 1) get NaN ``bos_mlp`` rows and keep the two together in
``biases and BOS``. The adapter's shift of the contrast, adapted minus base paired by prompt,
is then the sum of the parts' shifts, with no ratio that can exceed 1 or flip sign when a
contrast is near 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from em_circuits.analysis.aggregate import cluster_statistics
from em_circuits.analysis.effects import _label_rows, contrast_rows
from em_circuits.attribution.storage import CompactGraph
from em_circuits.core.stats import cluster_rows

#: The row that holds the contrast value itself (the sum of every other row).
VALUE = "contrast value"
#: The adapter nodes' direct effect (per layer).
ADAPTER = "adapter_nodes"
#: Each layer's MLP output at BOS (less the skip connection), where circuit-tracer zeroes
#: every feature and error node (per layer).
BOS_MLP = "bos_mlp"
#: What no node carries besides the MLP output at BOS: the transcoders' decoder biases after
#: BOS (and any bias of the model's own layers).
CONSTANTS = "biases"
#: The constant row of graphs stored without ``bos_mlp``: the biases and the MLP output at BOS.
CONSTANTS_WITH_BOS = "biases and BOS"


def _bos_mlp(graph: CompactGraph) -> np.ndarray | None:
    """Each layer's MLP output at BOS: its direct effect on the contrast; None when the graph
    does not store it."""
    if graph.bos_mlp is None:
        return None
    matrix = graph.bos_mlp.double().numpy()
    evil, safe, contrast = _label_rows(graph)
    return matrix[contrast] if contrast is not None else matrix[evil].mean(0) - matrix[safe].mean(0)


def _adapter_direct(graph: CompactGraph) -> tuple[np.ndarray, np.ndarray]:
    """(each adapter node's direct effect on the contrast, its layer); empty without nodes."""
    if not graph.n_adapter_nodes or graph.adapter_direct is None:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    matrix = graph.adapter_direct.double().numpy()
    evil, safe, contrast = _label_rows(graph)
    row = matrix[contrast] if contrast is not None else matrix[evil].mean(0) - matrix[safe].mean(0)
    return row, graph.adapter_nodes[:, 0].numpy()


def contrast_parts(graph: CompactGraph) -> pd.DataFrame:
    """One prompt's contrast value as a sum of direct contributions.

    Rows: part (features, errors, adapter_nodes, bos_mlp per layer; bos_errors, tokens,
    ``biases``, and ``contrast value``), layer (-1 when the part is not per layer), direct.
    Every row but the value sums to the value exactly. A graph without ``bos_mlp`` has NaN
    there and ``biases and BOS`` instead of ``biases``. Raises ValueError when the graph has
    no contrast.
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
    adapter, adapter_layers = _adapter_direct(graph)
    records += [
        {
            "part": ADAPTER,
            "layer": layer,
            "direct": float(adapter[adapter_layers == layer].sum()),
        }
        for layer in range(graph.n_layers)
    ]
    bos = _bos_mlp(graph)
    records += [
        {"part": BOS_MLP, "layer": layer, "direct": np.nan if bos is None else float(bos[layer])}
        for layer in range(graph.n_layers)
    ]
    explained = float(direct[: graph.n_sources].sum()) + float(adapter.sum())
    explained += float(bos.sum()) if bos is not None else 0.0
    records += [
        {"part": "bos_errors", "layer": -1, "direct": float(errors[:, 0].sum())},
        {"part": "tokens", "layer": -1, "direct": float(direct[graph.token_slice].sum())},
        {
            "part": CONSTANTS if bos is not None else CONSTANTS_WITH_BOS,
            "layer": -1,
            "direct": value - explained,
        },
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
    # graphs with and without bos_mlp have different constant rows: the union, in order
    index = base[prompts[0]].set_index(key).index
    for tables in (base, adapted):
        for p in prompts:
            index = index.append(tables[p].set_index(key).index.difference(index))
    last = index.get_level_values("part") == VALUE
    index = index[~last].append(index[last])

    def matrix(tables: Mapping[str, pd.DataFrame]) -> np.ndarray:
        return np.stack(
            [tables[p].set_index(key)["direct"].reindex(index).to_numpy() for p in prompts],
            axis=1,
        )

    values_base, values_adapted = matrix(base), matrix(adapted)
    used = np.isfinite(values_base) & np.isfinite(values_adapted)  # NaN: not stored
    shift = cluster_statistics(
        values_adapted - values_base, used, prompts, clusters, n_perm, seed, alpha=alpha
    )
    table = index.to_frame(index=False)
    table["n_prompts"] = len(prompts)
    table["n_clusters"] = shift["n_clusters"]
    names = [clusters.get(p, p) if clusters else p for p in prompts]
    for column, values in (("mean_base", values_base), ("mean_adapted", values_adapted)):
        rows, _ = cluster_rows(values, used, names)
        table[column] = [row.mean() if len(row) else np.nan for row in rows]
    for column in ("mean", "ci_low", "ci_high", "p_value", "p_method"):
        table["mean_shift" if column == "mean" else column] = shift[column]
    return table

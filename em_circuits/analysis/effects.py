"""Per-prompt feature effects on evil/safe targets, cross-prompt statistics, base vs adapted.

Everything here is pure analysis of :class:`~em_circuits.graph_store.CompactGraph` objects
(no model, no GPU). Features are identified by (layer, transcoder feature id), optionally with
a position relative to the end of the prompt, never by their index inside one graph: that
index names a different feature in every graph (the prior art's aggregation bug).

Pipeline:

1. :func:`prompt_effects` (one graph -> one row per feature key and metric), cached per prompt
   with :func:`cached_prompt_effects`;
2. :func:`aggregate_effects` (clusters of prompts as units: support, mean, t interval, sign
   consistency, sign-flip p-value with its method, BH q-value);
3. :func:`compare_models` (paired adapted - base differences and categories) and
   :func:`contrast_parts` / :func:`summarize_decomposition` (the adapter's shift of the
   contrast split into exact signed parts: features and error nodes per layer, BOS error
   nodes, tokens, biases).

The maths is in :data:`FORMULAS` (markdown, for the README).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from em_circuits.attribution.storage import CompactGraph
from em_circuits.core.stats import welch_t_rows
from em_circuits.core.verdicts import TARGET_LABELS

ANALYSIS_VERSION = 1


METRICS = ("direct", "total")


#: Labels of a graph's target rows: a labelled token's, or the evil-vs-safe contrast's.
TARGET_ROW_LABELS = (*TARGET_LABELS, "contrast")


@dataclass(frozen=True)
class PositionSpec:
    """How node positions enter a feature key. ``offset`` is relative to the end (-1 = last)."""

    mode: str  # "any" | "rel" | "each"
    offset: int | None = None

    @property
    def keyed(self) -> bool:
        """Whether the key carries a ``position`` column."""
        return self.mode != "any"


def parse_position(position: str) -> PositionSpec:
    """Parse ``"any"``, ``"last"``, ``"rel:-k"`` (k >= 1, ``"rel:-1"`` = last) or ``"each"``."""
    if position == "any":
        return PositionSpec("any")
    if position == "each":
        return PositionSpec("each")
    if position == "last":
        return PositionSpec("rel", -1)
    if position.startswith("rel:"):
        try:
            offset = int(position[4:])
        except ValueError:
            offset = 0
        if offset <= -1:
            return PositionSpec("rel", offset)
    raise ValueError(
        f"unknown position option {position!r}: use 'any', 'last', 'rel:-k' (k >= 1; "
        f"'rel:-1' is the last token) or 'each'"
    )


def key_columns(position: str | PositionSpec) -> list[str]:
    spec = parse_position(position) if isinstance(position, str) else position
    return ["layer", "feature", "position"] if spec.keyed else ["layer", "feature"]


def target_labels(graph: CompactGraph) -> list[str | None]:
    """Per target row: "evil", "safe", "contrast", or None (unlabeled, ignored).

    Reads ``meta["target_labels"]`` (aligned with the targets); otherwise maps
    ``meta["labels"]`` ({target name or token id: label}) and the contrast target kind.
    """
    aligned = graph.meta.get("target_labels")
    n_targets = len(graph.target_names)
    if aligned is not None:
        if len(aligned) != n_targets:
            raise ValueError(
                f"meta['target_labels'] has {len(aligned)} entries for {n_targets} targets"
            )
        return [label if label in TARGET_ROW_LABELS else None for label in aligned]
    mapping = graph.meta.get("labels") or {}
    labels: list[str | None] = []
    for t, (name, kind) in enumerate(zip(graph.target_names, graph.target_kinds)):
        if kind == "contrast":
            labels.append("contrast")
            continue
        label = mapping.get(name, mapping.get(str(int(graph.target_token_ids[t]))))
        labels.append(label if label in TARGET_LABELS else None)
    return labels


def _label_rows(graph: CompactGraph) -> tuple[list[int], list[int], int | None]:
    labels = target_labels(graph)
    evil = [t for t, lab in enumerate(labels) if lab == "evil"]
    safe = [t for t, lab in enumerate(labels) if lab == "safe"]
    contrast = next((t for t, lab in enumerate(labels) if lab == "contrast"), None)
    return evil, safe, contrast


def contrast_rows(graph: CompactGraph) -> dict[str, Any] | None:
    """The contrast target's direct row, total row and value (numpy, float64).

    Taken from the graph's contrast target when it has one, else built as mean(evil rows) -
    mean(safe rows) (the same definition). None when neither is possible.
    """
    evil, safe, contrast = _label_rows(graph)
    if contrast is not None:
        return {
            "direct": graph.direct[contrast].double().numpy(),
            "total": graph.total[contrast].double().numpy(),
            "value": float(graph.target_values[contrast]),
            "source": "target",
        }
    if not evil or not safe:
        return None

    def diff(matrix) -> np.ndarray:
        m = matrix.double().numpy()
        return m[evil].mean(axis=0) - m[safe].mean(axis=0)

    values = graph.target_values.double().numpy()
    return {
        "direct": diff(graph.direct),
        "total": diff(graph.total),
        "value": float(values[evil].mean() - values[safe].mean()),
        "source": "diff",
    }


def _group_features(
    graph: CompactGraph, spec: PositionSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(node indices kept, group index of each kept node, unique key rows)."""
    feats = graph.features.numpy().astype(np.int64)
    if feats.shape[0] == 0:
        width = 3 if spec.keyed else 2
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, width), np.int64)
    relative = feats[:, 1] - graph.n_pos  # last position -> -1
    keep = np.ones(len(feats), bool) if spec.mode != "rel" else relative == spec.offset
    nodes = np.flatnonzero(keep)
    cols = [feats[nodes, 0], feats[nodes, 2]]
    if spec.keyed:
        cols.append(relative[nodes])
    raw = np.stack(cols, axis=1) if len(nodes) else np.zeros((0, len(cols)), np.int64)
    # One int64 per key sorts like the rows (lexicographically) and is many times faster to
    # make unique than rows are (totals graphs hold every active feature: tens of thousands).
    if len(nodes):
        low = raw.min(axis=0)
        span = raw.max(axis=0) - low + 1
        if float(np.prod(span.astype(np.float64))) < 2.0**62:
            packed = np.zeros(len(nodes), np.int64)
            for col in range(raw.shape[1]):
                packed = packed * span[col] + (raw[:, col] - low[col])
            _, first, inverse = np.unique(packed, return_index=True, return_inverse=True)
            return nodes, inverse.reshape(-1), raw[first]
    keys, inverse = np.unique(raw, axis=0, return_inverse=True)
    return nodes, inverse.reshape(-1), keys


def _sum_groups(values: np.ndarray, inverse: np.ndarray, n_groups: int) -> np.ndarray:
    """Per-group sums of ``values`` (rows grouped by ``inverse``), in float64: one weighted
    bincount per column (``np.add.at`` is ten times slower on a graph's 10^5-10^6 nodes)."""
    if values.ndim == 1:
        return np.bincount(inverse, weights=values, minlength=n_groups)  # float64
    return _sum_groups_of_rows(np.ascontiguousarray(values.T), inverse, n_groups)


def _sum_groups_of_rows(rows: np.ndarray, inverse: np.ndarray, n_groups: int) -> np.ndarray:
    """``(n_groups, len(rows))``: each row of ``rows`` (targets x nodes) summed per group."""
    out = np.empty((n_groups, rows.shape[0]))
    for index, row in enumerate(rows):
        out[:, index] = np.bincount(inverse, weights=row, minlength=n_groups)
    return out


def prompt_effects(
    graph: CompactGraph, position: str = "any", metrics: Sequence[str] = METRICS
) -> pd.DataFrame:
    """One row per feature key and metric: its effects on the evil/safe/contrast targets.

    Columns: layer, feature, [position], metric, activation (summed over the key's nodes),
    n_nodes, n_evil, n_safe, evil_mean, safe_mean, evil_minus_safe, contrast, contrast_from
    ("target" or "diff" when the graph has no contrast target), within_prompt_welch_t,
    within_prompt_welch_df. Effect columns are NaN when their label set is empty. See
    :data:`FORMULAS`.
    """
    spec = parse_position(position)
    nodes, inverse, keys = _group_features(graph, spec)
    evil, safe, _ = _label_rows(graph)
    contrast = contrast_rows(graph)
    n_keys = len(keys)
    activation = _sum_groups(graph.activations.double().numpy()[nodes], inverse, n_keys)
    n_nodes = np.bincount(inverse, minlength=n_keys)
    frames = []
    for metric in metrics:
        matrix = getattr(graph, metric).double().numpy()
        per_key = _sum_groups_of_rows(matrix[:, nodes], inverse, n_keys)  # (keys, targets)
        evil_fx, safe_fx = per_key[:, evil], per_key[:, safe]
        nan = np.full(n_keys, np.nan)
        evil_mean = evil_fx.mean(axis=1) if evil else nan
        safe_mean = safe_fx.mean(axis=1) if safe else nan
        t, df = welch_t_rows(evil_fx, safe_fx) if evil and safe else (nan, nan)
        if contrast is None:
            contrast_fx = nan
        else:
            contrast_fx = _sum_groups(contrast[metric][nodes], inverse, n_keys)
        frame: dict[str, Any] = {col: keys[:, i] for i, col in enumerate(key_columns(spec))}
        frame.update(
            metric=metric,
            activation=activation,
            n_nodes=n_nodes,
            n_evil=len(evil),
            n_safe=len(safe),
            evil_mean=evil_mean,
            safe_mean=safe_mean,
            evil_minus_safe=evil_mean - safe_mean,
            contrast=contrast_fx,
            contrast_from=None if contrast is None else contrast["source"],
            within_prompt_welch_t=t,
            within_prompt_welch_df=df,
        )
        frames.append(pd.DataFrame(frame))
    return _empty_effects(spec) if not frames else pd.concat(frames, ignore_index=True)


def _empty_effects(spec: PositionSpec) -> pd.DataFrame:
    return pd.DataFrame(columns=key_columns(spec) + ["metric", "contrast"])


def target_effects(
    graph: CompactGraph, position: str = "any", metrics: Sequence[str] = METRICS
) -> pd.DataFrame:
    """Long table of every feature key's effect on every target row (labeled or not).

    Columns: layer, feature, [position], metric, target (row index), target_name, token_id,
    kind, label, effect.
    """
    spec = parse_position(position)
    nodes, inverse, keys = _group_features(graph, spec)
    labels = target_labels(graph)
    n_targets = len(graph.target_names)
    frames = []
    for metric in metrics:
        matrix = getattr(graph, metric).double().numpy()
        per_key = _sum_groups_of_rows(matrix[:, nodes], inverse, len(keys))
        frame: dict[str, Any] = {
            col: np.repeat(keys[:, i], n_targets) for i, col in enumerate(key_columns(spec))
        }
        frame.update(
            metric=metric,
            target=np.tile(np.arange(n_targets), len(keys)),
            target_name=np.tile(np.array(graph.target_names, dtype=object), len(keys)),
            token_id=np.tile(graph.target_token_ids.numpy(), len(keys)),
            kind=np.tile(np.array(graph.target_kinds, dtype=object), len(keys)),
            label=np.tile(np.array(labels, dtype=object), len(keys)),
            effect=per_key.reshape(-1),
        )
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True)

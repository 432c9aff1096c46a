"""Per-prompt feature effects on evil/safe targets, cross-prompt statistics, base vs adapted.

Everything here is pure analysis of :class:`~em_circuits.graph_store.CompactGraph` objects
(no model, no GPU). Features are identified by (layer, transcoder feature id), optionally with
a position relative to the end of the prompt, never by their index inside one graph: that
index names a different feature in every graph (the prior art's aggregation bug).

Pipeline:

1. :func:`prompt_effects` (one graph -> one row per feature key and metric), cached per prompt
   with :func:`cached_prompt_effects`;
2. :func:`aggregate_effects` (prompts as units: support, mean, bootstrap CI, sign consistency,
   sign-flip p-value, BH q-value);
3. :func:`compare_models` (paired adapted - base differences and categories) and
   :func:`error_share` / :func:`summarize_error_share` (who carries the contrast: features,
   error nodes per layer, tokens).

The maths is in :data:`FORMULAS` (markdown, for the README).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from em_circuits.graph_store import CompactGraph, content_fingerprint
from em_circuits.stats import bh_qvalues, bootstrap_mean_ci, sign_flip_pvalues, welch_t_rows
from em_circuits.store import ResultsStore, params_key, read_artifact, write_artifact

log = logging.getLogger(__name__)

#: Bump when a formula or a column of :func:`prompt_effects` changes: it invalidates caches.
ANALYSIS_VERSION = 1
METRICS = ("direct", "total")
LABELS = ("evil", "safe", "contrast")

FORMULAS = r"""
### Formulas

Notation for one prompt and one model: `A[t, s]` is the direct effect of source node `s`
(feature, error node or token) on target `t` in the linearised model, `a_f` the activation of
feature `f`, `B = A[:, F] diag(1/a_F)`; targets are labeled token logits (evil set `E`,
safe set `S`) and the contrast direction `c = mean_{e in E} logit(e) - mean_{s in S} logit(s)`.

* **Direct effect** `direct[t, s] = A[t, s]`.
* **Total effect** `total[t, s] = A[t, s] + sum_{f in F} (B_TF (I - B_FF)^-1)[t, f] A[f, s]`:
  the sum over every path `s -> f_1 -> ... -> f_k -> t` through features of the product of
  its edge weights, each divided by the activation of the feature it leaves. Error nodes and
  tokens are inputs; a feature's total effect is the linearised change of `t` when the
  feature is zeroed.
* **Feature key.** Effects of all graph nodes with the same (layer, transcoder feature id) are
  summed: over all positions (`position="any"`), only the last (`"last"` = `"rel:-1"`), the
  k-th from the end (`"rel:-k"`), or each relative position separately (`"each"`). Summing is
  exact for zeroing: two nodes of one layer never lie on a common path.
* **Per prompt**, for metric `m` in {direct, total} and feature key `k`:
  `evil_mean = mean_{e in E} m[e, k]`, `safe_mean = mean_{s in S} m[s, k]`,
  `evil_minus_safe = evil_mean - safe_mean`, and `contrast = m[c, k]` (the contrast target's
  row). Every row of `total` is linear in the target's row of `A`, so
  `contrast == evil_minus_safe` for both metrics whenever `c` is built from the same sets.
  `within_prompt_welch_t = evil_minus_safe / sqrt(var_E/|E| + var_S/|S|)` (needs |E|, |S| >= 2):
  its units are the target *tokens of one prompt*, it is a descriptive statistic, not a test
  across prompts.
* **Across prompts** (prompt = unit; `x_p` = the per-prompt value, default `contrast`):
  `support` = number of prompts in which the key is a graph node (a feature may be active
  but pruned from a graph: absent means "not among the graph's nodes"). With
  `absent="zero"` an absent key contributes `x_p = 0` (n = all prompts); with
  `absent="missing"` it is left out (n = support). Prompts whose value is undefined (no
  evil or no safe target) are left out entirely. `mean = (1/n) sum_p x_p`;
  `[ci_low, ci_high]` = percentile bootstrap interval of the mean (prompts resampled with
  replacement, seeded); `sign_consistency` = share of the supporting prompts whose `x_p`
  has the sign of the mean; `p_value` = two-sided sign-flip permutation test of H0 "x_p is
  symmetric around 0" with statistic `|sum_p x_p|` (exact over all 2^n sign patterns for
  n <= 12, else Monte Carlo with `(1 + hits) / (1 + draws)`); `q_value` =
  Benjamini-Hochberg adjusted p over all keys with `support >= min_support`, separately per
  metric. With n prompts no p-value can be below 2 / 2^n: few prompts, no discoveries.
* **Base vs adapted** (paired on prompts present in both): `d_p = x_p(adapted) - x_p(base)`
  with absent = 0; `mean_diff`, paired bootstrap CI and sign-flip p of `d_p`. Category:
  `gained` (never in a base graph, in >= 1 adapted graph), `lost` (the reverse), else
  `strengthened` / `weakened` (|mean_adapted| above / below |mean_base|) when
  `|mean_diff| > threshold` and, if at least `ci_min_n` prompts have the key in either model,
  the CI excludes 0; else `unchanged`. `shift` says the sign of `mean_diff` (toward evil > 0).
* **Who carries the contrast** (per prompt): direct: `value(c) = sum_f A[c, f] +
  sum_{errors} A[c, e] + sum_{tokens} A[c, x] + bias`, an exact partition; total: `value(c)
  = sum_{errors} total[c, e] + sum_{tokens} total[c, x] + remainder`, also a partition
  (errors and tokens are the roots; the remainder holds the biases, propagated through the
  features, and the effect of any active feature not kept in the graph).
  `error share of layer l = sum_{e in layer l} total[c, e] / value(c)`. The features' summed
  total effect is reported too, but it is a flow through intermediate nodes and overlaps the
  roots' shares; it is not additive.
"""


# -- positions and labels --------------------------------------------------------------------
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
        return [label if label in LABELS else None for label in aligned]
    mapping = graph.meta.get("labels") or {}
    labels: list[str | None] = []
    for t, (name, kind) in enumerate(zip(graph.target_names, graph.target_kinds)):
        if kind == "contrast":
            labels.append("contrast")
            continue
        label = mapping.get(name, mapping.get(str(int(graph.target_token_ids[t]))))
        labels.append(label if label in ("evil", "safe") else None)
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


def contrast_residual(graph: CompactGraph) -> dict[str, float]:
    """Max |contrast row - (mean evil rows - mean safe rows)| per metric, and for the value.

    A sanity check for generated graphs: it should be ~0 (float32 rounding) when the contrast
    target was built from the labeled token targets. NaN when the graph lacks either side.
    """
    evil, safe, contrast = _label_rows(graph)
    if contrast is None or not evil or not safe:
        return {"direct": math.nan, "total": math.nan, "value": math.nan}
    out = {}
    for metric in METRICS:
        m = getattr(graph, metric).double().numpy()
        out[metric] = float(np.abs(m[contrast] - (m[evil].mean(0) - m[safe].mean(0))).max())
    v = graph.target_values.double().numpy()
    out["value"] = float(abs(v[contrast] - (v[evil].mean() - v[safe].mean())))
    return out


# -- per prompt ------------------------------------------------------------------------------
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
    keys, inverse = np.unique(raw, axis=0, return_inverse=True)
    return nodes, inverse.reshape(-1), keys


def _sum_groups(values: np.ndarray, inverse: np.ndarray, n_groups: int) -> np.ndarray:
    out = np.zeros((n_groups,) + values.shape[1:])
    np.add.at(out, inverse, values)
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
        per_key = _sum_groups(matrix[:, nodes].T, inverse, n_keys)  # (keys, targets)
        evil_fx, safe_fx = per_key[:, evil], per_key[:, safe]
        nan = np.full(n_keys, np.nan)
        evil_mean = evil_fx.mean(axis=1) if evil else nan
        safe_mean = safe_fx.mean(axis=1) if safe else nan
        t, df = welch_t_rows(evil_fx, safe_fx) if evil and safe else (nan, nan)
        if contrast is None:
            contrast_fx = nan
        else:
            contrast_fx = _sum_groups(contrast[metric][nodes], inverse, n_keys)
        frame = {col: keys[:, i] for i, col in enumerate(key_columns(spec))}
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
        per_key = _sum_groups(matrix[:, nodes].T, inverse, len(keys))
        frame = {col: np.repeat(keys[:, i], n_targets) for i, col in enumerate(key_columns(spec))}
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


# -- across prompts --------------------------------------------------------------------------
def _key_columns_of(frames: Mapping[str, pd.DataFrame]) -> list[str]:
    keyed = {("position" in frame.columns) for frame in frames.values()}
    if len(keyed) > 1:
        raise ValueError("per-prompt tables mix position options; recompute them with one option")
    return ["layer", "feature", "position"] if keyed.pop() else ["layer", "feature"]


def _value_matrix(
    frames: Mapping[str, pd.DataFrame], metric: str, value: str, keys: list[str]
) -> pd.DataFrame:
    """Keys x prompts matrix of one per-prompt column; NaN where the key is absent.

    Prompts where the value is undefined for every key (e.g. no safe label for evil_minus_safe)
    are dropped with a warning, since absence there would not mean "no effect".
    """
    columns = {}
    for pid, frame in frames.items():
        rows = frame[frame["metric"] == metric]
        if len(rows) and rows[value].isna().all():
            log.warning("prompt %s: %s is undefined (missing labels); left out", pid, value)
            continue
        series = rows.set_index(keys)[value].astype(float)
        if not series.index.is_unique:
            raise ValueError(f"prompt {pid}: duplicate feature keys in its effects table")
        columns[pid] = series
    if not columns:
        return pd.DataFrame(index=pd.MultiIndex.from_arrays([[]] * len(keys), names=keys))
    matrix = pd.concat(columns, axis=1, sort=True)
    return matrix


def _rows(matrix: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    return [row[m] for row, m in zip(matrix, mask)]


def _sign_consistency(values: np.ndarray, present: np.ndarray, mean: np.ndarray) -> np.ndarray:
    agree = (np.sign(np.nan_to_num(values)) == np.sign(mean)[:, None]) & present
    with np.errstate(invalid="ignore", divide="ignore"):
        return agree.sum(axis=1) / present.sum(axis=1)


def aggregate_effects(
    per_prompt: Mapping[str, pd.DataFrame],
    value: str = "contrast",
    absent: str = "zero",
    min_support: int = 2,
    metrics: Sequence[str] = METRICS,
    n_boot: int = 2000,
    n_perm: int = 9999,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Cross-prompt statistics per feature key, prompts as the units.

    ``per_prompt`` maps prompt id -> :func:`prompt_effects` table (one position option for
    all). ``value`` is the per-prompt column to aggregate (contrast, evil_minus_safe,
    evil_mean, safe_mean). ``absent``: "zero" (an absent key contributes 0) or "missing" (left
    out). Keys with support < ``min_support`` are dropped before testing, so they do not
    dilute the FDR correction. Columns: layer, feature, [position], metric, support,
    n_prompts (values averaged), mean, ci_low, ci_high, sign_consistency, p_value, q_value,
    mean_activation; sorted by metric, then mean descending (most evil-promoting first).
    """
    if absent not in ("zero", "missing"):
        raise ValueError(f"absent must be 'zero' or 'missing', not {absent!r}")
    if not per_prompt:
        raise ValueError("no per-prompt effect tables to aggregate")
    keys = _key_columns_of(per_prompt)
    tables = [
        _aggregate_metric(per_prompt, metric, value, absent, min_support, keys,
                          n_boot=n_boot, n_perm=n_perm, ci=ci, seed=seed)
        for metric in metrics
    ]
    out = pd.concat(tables, ignore_index=True)
    return out.sort_values(["metric", "mean"], ascending=[True, False], kind="stable",
                           ignore_index=True)


def _aggregate_metric(
    per_prompt: Mapping[str, pd.DataFrame],
    metric: str,
    value: str,
    absent: str,
    min_support: int,
    keys: list[str],
    **options: Any,
) -> pd.DataFrame:
    matrix = _value_matrix(per_prompt, metric, value, keys)
    activation = _value_matrix(per_prompt, metric, "activation", keys).reindex(
        index=matrix.index, columns=matrix.columns
    )
    values = matrix.to_numpy(dtype=np.float64)
    present = ~np.isnan(values)
    support = present.sum(axis=1)
    keep = support >= max(min_support, 1)
    values, present, support = values[keep], present[keep], support[keep]
    index = matrix.index[keep]
    # The statistic's sample: all prompts (absent = 0) or the supporting prompts only.
    used = np.ones_like(present) if absent == "zero" else present
    filled = np.nan_to_num(values)
    samples = _rows(filled, used)
    n_used = used.sum(axis=1)
    mean = filled.sum(axis=1) / np.maximum(n_used, 1)
    ci_low, ci_high = bootstrap_mean_ci(samples, options["n_boot"], options["ci"], options["seed"])
    # Zeros never change a sign-flip statistic: testing the nonzero values is the same test.
    p = sign_flip_pvalues(_rows(filled, filled != 0), options["n_perm"], options["seed"])
    table = index.to_frame(index=False)
    table["metric"] = metric
    table["support"] = support
    table["n_prompts"] = n_used
    table["mean"] = mean
    table["ci_low"] = ci_low
    table["ci_high"] = ci_high
    table["sign_consistency"] = _sign_consistency(values, present, mean)
    table["p_value"] = p
    table["q_value"] = bh_qvalues(p)
    table["mean_activation"] = np.nanmean(
        np.where(present, activation.to_numpy(dtype=np.float64)[keep], np.nan), axis=1
    ) if len(table) else []
    return table.astype({col: "int64" for col in keys})


# -- base vs adapted ---------------------------------------------------------------------------
CATEGORIES = ("gained", "lost", "strengthened", "weakened", "unchanged")


def compare_models(
    base: Mapping[str, pd.DataFrame],
    adapted: Mapping[str, pd.DataFrame],
    metric: str = "total",
    value: str = "contrast",
    threshold: float = 0.05,
    min_support: int = 2,
    ci_min_n: int = 3,
    n_boot: int = 2000,
    n_perm: int = 9999,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired adapted - base differences of a per-prompt value, per feature key.

    Only prompts with a table for both models are used (paired); an absent key counts as 0
    in both (a gained feature changes the contrast from nothing). Keys present in fewer than
    ``min_support`` prompts in both models are dropped. ``threshold`` is in the value's units
    (logits). Columns: layer, feature, [position], metric, n_prompts, support_base,
    support_adapted, mean_base, mean_adapted, mean_diff, ci_low, ci_high, p_value, q_value,
    category (see :data:`CATEGORIES` and :data:`FORMULAS`), shift (toward_evil/toward_safe/none);
    sorted by mean_diff descending.
    """
    if not base or not adapted:
        raise ValueError("compare_models needs per-prompt tables of both models")
    keys = _key_columns_of({**base, **adapted})
    mb = _value_matrix(base, metric, value, keys)
    ma = _value_matrix(adapted, metric, value, keys)
    prompts = sorted(set(mb.columns) & set(ma.columns))
    dropped = sorted(set(mb.columns) ^ set(ma.columns))
    if dropped:
        log.warning("base vs adapted: %d prompt(s) lack one model's table: %s", len(dropped),
                    ", ".join(dropped[:5]))
    index = mb.index.union(ma.index)
    b = mb.reindex(index=index, columns=prompts).to_numpy(dtype=np.float64)
    a = ma.reindex(index=index, columns=prompts).to_numpy(dtype=np.float64)
    in_b, in_a = ~np.isnan(b), ~np.isnan(a)
    keep = np.maximum(in_b.sum(1), in_a.sum(1)) >= max(min_support, 1)
    b, a, in_b, in_a, index = b[keep], a[keep], in_b[keep], in_a[keep], index[keep]
    b, a = np.nan_to_num(b), np.nan_to_num(a)
    diff = a - b
    n = len(prompts)
    table = index.to_frame(index=False)
    table["metric"] = metric
    table["n_prompts"] = n
    table["support_base"] = in_b.sum(axis=1)
    table["support_adapted"] = in_a.sum(axis=1)
    table["mean_base"] = b.mean(axis=1) if n else np.nan
    table["mean_adapted"] = a.mean(axis=1) if n else np.nan
    table["mean_diff"] = diff.mean(axis=1) if n else np.nan
    low, high = bootstrap_mean_ci(list(diff), n_boot, ci, seed)
    table["ci_low"], table["ci_high"] = low, high
    p = sign_flip_pvalues(_rows(diff, diff != 0), n_perm, seed)
    table["p_value"] = p
    table["q_value"] = bh_qvalues(p)
    either = (in_a | in_b).sum(axis=1)
    table["category"] = _categories(table, either, threshold, ci_min_n)
    table["shift"] = np.select([table["mean_diff"] > 0, table["mean_diff"] < 0],
                               ["toward_evil", "toward_safe"], default="none")
    table = table.astype({col: "int64" for col in keys})
    return table.sort_values("mean_diff", ascending=False, kind="stable", ignore_index=True)


def _categories(
    table: pd.DataFrame, either: np.ndarray, threshold: float, ci_min_n: int
) -> np.ndarray:
    gained = (table["support_base"] == 0) & (table["support_adapted"] > 0)
    lost = (table["support_adapted"] == 0) & (table["support_base"] > 0)
    excludes_zero = (table["ci_low"] > 0) | (table["ci_high"] < 0)
    # With too few supporting prompts a bootstrap CI is degenerate; the threshold decides.
    certain = excludes_zero | (either < ci_min_n)
    changed = (table["mean_diff"].abs() > threshold) & certain
    stronger = table["mean_adapted"].abs() > table["mean_base"].abs()
    return np.select(
        [gained, lost, changed & stronger, changed & ~stronger],
        ["gained", "lost", "strengthened", "weakened"],
        default="unchanged",
    )


# -- error nodes: who carries the contrast -----------------------------------------------------
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
        {"group": "error", "layer": layer, "direct": errors_direct[layer].sum(),
         "total": errors_total[layer].sum()}
        for layer in range(graph.n_layers)
    ]
    records += [
        {"group": "errors", "layer": -1, "direct": errors_direct.sum(),
         "total": errors_total.sum()},
        {"group": "tokens", "layer": -1, "direct": tokens_direct, "total": tokens_total},
        {"group": "features", "layer": -1, "direct": rows["direct"][f].sum(),
         "total": rows["total"][f].sum()},
        {"group": "bias", "layer": -1,
         "direct": value - rows["direct"][: graph.n_sources].sum(),
         "total": value - errors_total.sum() - tokens_total},
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


# -- per-prompt cache --------------------------------------------------------------------------
def graph_fingerprint(graph: CompactGraph) -> str:
    """The graph's content fingerprint (what the per-prompt cache is keyed by)."""
    return content_fingerprint(graph)


def effects_params(position: str, metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """The parameters a per-prompt effects table depends on (the cache key)."""
    parse_position(position)
    return {"analysis_version": ANALYSIS_VERSION, "position": position,
            "metrics": list(metrics)}


def _json_value(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        # NaN is not JSON: null, read back as NaN. 7 significant digits = the float32 precision
        # of the graphs, and half the file size of full float64 reprs.
        return None if math.isnan(value) else float(f"{value:.7g}")
    if isinstance(value, np.integer):
        return int(value)
    return value


def _json_rows(frame: pd.DataFrame) -> list[list[Any]]:
    # Rows as lists under one "columns" header: dicts would repeat every column name per
    # feature and triple the file size (~8k features x 2 metrics per prompt).
    return [[_json_value(v) for v in row] for row in frame.itertuples(index=False, name=None)]


def write_prompt_effects(
    path: Path,
    effects: pd.DataFrame,
    prompt_id: str,
    model_fingerprint: str,
    graph_fingerprint: str,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Write a per-prompt effects table as a "feature_effects" artifact; returns the envelope.

    ``features`` holds one list per table row, in the order of ``columns``; read it back with
    :func:`read_prompt_effects`.
    """
    payload = {
        "prompt_id": prompt_id,
        "model_fingerprint": model_fingerprint,
        "graph_fingerprint": graph_fingerprint,
        "params": params,
        "params_key": params_key(params),
        "columns": list(effects.columns),
        "features": _json_rows(effects),
    }
    return write_artifact(path, "feature_effects", payload)


def read_prompt_effects(
    path: Path,
    model_fingerprint: str | None = None,
    graph_fingerprint: str | None = None,
    params: dict[str, Any] | None = None,
) -> pd.DataFrame | None:
    """Read a cached table; None when absent or made from another model, graph or params."""
    path = Path(path)
    if not path.exists():
        return None
    data = read_artifact(path, "feature_effects")
    expected = {"model_fingerprint": model_fingerprint, "graph_fingerprint": graph_fingerprint,
                "params": params}
    if any(want is not None and data.get(key) != want for key, want in expected.items()):
        return None
    frame = pd.DataFrame.from_records(data["features"], columns=data.get("columns"))
    text = {"metric", "contrast_from"}
    numeric = [c for c in frame.columns if c not in text]
    return frame.astype({c: "float64" for c in numeric}).astype(
        {c: "int64" for c in ("layer", "feature", "position", "n_nodes", "n_evil", "n_safe")
         if c in frame.columns}
    )


def cached_prompt_effects(
    store: ResultsStore,
    graph: CompactGraph,
    model_slug: str,
    prompt_id: str,
    model_fingerprint: str,
    position: str = "any",
    metrics: Sequence[str] = METRICS,
    force: bool = False,
) -> pd.DataFrame:
    """:func:`prompt_effects` through the per-prompt cache under ``features/``."""
    params = effects_params(position, metrics)
    path = store.features_path(model_slug, prompt_id, params_key(params))
    fp = graph_fingerprint(graph)
    if not force:
        cached = read_prompt_effects(path, model_fingerprint, fp, params)
        if cached is not None:
            return cached
    effects = prompt_effects(graph, position, metrics)
    write_prompt_effects(path, effects, prompt_id, model_fingerprint, fp, params)
    # Use the stored (rounded) values either way, so a resumed run equals an uninterrupted one.
    return read_prompt_effects(path)

"""Feature effects across prompts: means, intervals, sign consistency, p- and q-values."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from em_circuits.analysis.effects import METRICS
from em_circuits.core.stats import (
    bh_qvalues,
    cluster_rows,
    row_means,
    sign_flip_test,
    t_mean_ci,
)

log = logging.getLogger(__name__)


def _key_columns_of(frames: Mapping[str, pd.DataFrame]) -> list[str]:
    keyed = {("position" in frame.columns) for frame in frames.values()}
    if len(keyed) > 1:
        raise ValueError("per-prompt tables mix position options; recompute them with one option")
    return ["layer", "feature", "position"] if keyed.pop() else ["layer", "feature"]


#: Bits of a packed key (layer, feature, position): 12 + 31 + 20 = 63, one int64.
_FEATURE_BITS, _POSITION_BITS = 31, 20
_POSITION_SHIFT = 1 << (_POSITION_BITS - 1)


def _packed_keys(rows: pd.DataFrame, keys: list[str]) -> np.ndarray:
    """Each row's key as one int64 that sorts as the (layer, feature[, position]) tuple."""
    packed = rows["layer"].to_numpy(dtype=np.int64) << (_FEATURE_BITS + _POSITION_BITS)
    packed |= rows["feature"].to_numpy(dtype=np.int64) << _POSITION_BITS
    if "position" in keys:  # offsets from the end are negative: shifted into [0, 2^20)
        packed |= rows["position"].to_numpy(dtype=np.int64) + _POSITION_SHIFT
    return packed


def unpack_keys(packed: np.ndarray, keys: list[str]) -> pd.MultiIndex:
    """The (layer, feature[, position]) index of packed keys (:func:`_packed_keys`)."""
    arrays = [
        packed >> (_FEATURE_BITS + _POSITION_BITS),
        (packed >> _POSITION_BITS) & ((1 << _FEATURE_BITS) - 1),
        (packed & ((1 << _POSITION_BITS) - 1)) - _POSITION_SHIFT,
    ]
    return pd.MultiIndex.from_arrays(arrays[: len(keys)], names=keys)


@dataclass(frozen=True)
class KeyMatrix:
    """Keys x prompts values of one per-prompt column, NaN where a key is absent; keys packed
    (:func:`_packed_keys`) and sorted."""

    packed: np.ndarray
    prompts: list[str]
    values: np.ndarray

    def index(self, keys: list[str]) -> pd.MultiIndex:
        return unpack_keys(self.packed, keys)

    def aligned(self, packed: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """The values at these keys (a sorted superset of ours) and prompts, NaN elsewhere."""
        where = {p: j for j, p in enumerate(self.prompts)}
        ours = [j for j, p in enumerate(prompts) if p in where]
        columns = [where[prompts[j]] for j in ours]
        if np.array_equal(packed, self.packed) and columns == list(range(len(prompts))):
            return self.values
        out = np.full((len(packed), len(prompts)), np.nan)
        rows = np.searchsorted(packed, self.packed)
        out[np.ix_(rows, np.asarray(ours, dtype=np.int64))] = self.values[:, columns]
        return out


def _value_matrix(
    frames: Mapping[str, pd.DataFrame], metric: str, value: str, keys: list[str]
) -> KeyMatrix:
    """Keys x prompts matrix of one per-prompt column; NaN where the key is absent.

    Prompts where the value is undefined for every key (e.g. no safe label for
    evil_minus_safe) are dropped with a warning, since absence there would not mean "no
    effect". (Keys are packed into one integer each, so that the union of many prompts'
    hundreds of thousands of keys is one sort, not an index join per prompt.)
    """
    columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for pid, frame in frames.items():
        rows = frame[frame["metric"] == metric]
        if len(rows) and rows[value].isna().all():
            log.warning("prompt %s: %s is undefined (missing labels); left out", pid, value)
            continue
        ranges = {
            "layer": (0, 1 << 12),
            "feature": (0, 1 << _FEATURE_BITS),
            "position": (-_POSITION_SHIFT, _POSITION_SHIFT),
        }
        for column, (low, high) in ranges.items():
            if column in keys and len(rows):
                if rows[column].min() < low or rows[column].max() >= high:
                    raise ValueError(f"prompt {pid}: {column} out of range in its effects table")
        packed = _packed_keys(rows, keys)
        order = np.argsort(packed, kind="stable")
        packed = packed[order]
        if len(packed) > 1 and bool((packed[1:] == packed[:-1]).any()):
            raise ValueError(f"prompt {pid}: duplicate feature keys in its effects table")
        columns[pid] = (packed, rows[value].to_numpy(dtype=np.float64)[order])
    if not columns:
        return KeyMatrix(np.zeros(0, dtype=np.int64), [], np.zeros((0, 0)))
    union = np.concatenate([packed for packed, _ in columns.values()])
    union.sort()
    union = union[np.concatenate([[True], union[1:] != union[:-1]])]
    matrix = np.full((len(union), len(columns)), np.nan)
    for j, (packed, values) in enumerate(columns.values()):
        matrix[np.searchsorted(union, packed), j] = values
    return KeyMatrix(union, list(columns), matrix)


def cluster_statistics(
    values: np.ndarray,
    used: np.ndarray,
    prompts: Sequence[str],
    clusters: Mapping[str, str] | None,
    n_perm: int = 9999,
    seed: int = 0,
    ci: float = 0.95,
    alpha: float = 0.05,
    alternative: str = "two-sided",
) -> dict[str, np.ndarray]:
    """Mean, interval and test of each row with clusters of prompts as the units.

    ``values`` (rows, prompts) and ``used`` (which entries enter the statistic); prompts
    of one cluster (``clusters``: prompt id -> cluster; default: each prompt its own) are
    averaged first, so a scenario asked ten ways counts once. Returns n_clusters, mean (over
    clusters), ci_low / ci_high (Student t over clusters), p_value, p_method (see
    :func:`~em_circuits.core.stats.sign_flip_test`; NaN p where n cannot reach ``alpha``) and
    q_value (Benjamini-Hochberg over the rows that have a p-value).
    """
    names = [clusters.get(p, p) if clusters else p for p in prompts]
    rows, n_clusters = cluster_rows(values, used, names)
    mean = row_means(rows)
    low, high = t_mean_ci(rows, ci)
    p, method = sign_flip_test(rows, n_perm, seed, alternative=alternative, alpha=alpha)
    return {
        "n_clusters": n_clusters,
        "mean": mean,
        "ci_low": low,
        "ci_high": high,
        "p_value": p,
        "p_method": method,
        "q_value": bh_qvalues(p),
    }


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
    n_perm: int = 9999,
    ci: float = 0.95,
    seed: int = 0,
    clusters: Mapping[str, str] | None = None,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Cross-prompt statistics per feature key, clusters of prompts as the units.

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
        _aggregate_metric(
            per_prompt,
            metric,
            value,
            absent,
            min_support,
            keys,
            n_perm=n_perm,
            ci=ci,
            seed=seed,
            clusters=clusters,
            alpha=alpha,
        )
        for metric in metrics
    ]
    out = pd.concat(tables, ignore_index=True)
    return out.sort_values(
        ["metric", "mean"], ascending=[True, False], kind="stable", ignore_index=True
    )


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
    activation = _value_matrix(per_prompt, metric, "activation", keys).aligned(
        matrix.packed, matrix.prompts
    )
    values = matrix.values
    present = ~np.isnan(values)
    support = present.sum(axis=1)
    keep = support >= max(min_support, 1)
    values, present, support = values[keep], present[keep], support[keep]
    index = matrix.index(keys)[keep]
    # The statistic's sample: all prompts (absent = 0) or the supporting prompts only.
    used = np.ones_like(present) if absent == "zero" else present
    filled = np.nan_to_num(values)
    stats = cluster_statistics(
        filled,
        used,
        matrix.prompts,
        options["clusters"],
        options["n_perm"],
        options["seed"],
        options["ci"],
        options["alpha"],
    )
    table = index.to_frame(index=False)
    table["metric"] = metric
    table["support"] = support
    table["n_prompts"] = used.sum(axis=1)
    for column in ("n_clusters", "mean", "ci_low", "ci_high"):
        table[column] = stats[column]
    table["sign_consistency"] = _sign_consistency(values, present, stats["mean"])
    for column in ("p_value", "p_method", "q_value"):
        table[column] = stats[column]
    table["mean_activation"] = (
        np.nanmean(np.where(present, activation[keep], np.nan), axis=1) if len(table) else []
    )
    return table.astype({col: "int64" for col in keys})

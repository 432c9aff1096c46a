"""Base vs adapted: which features the adapter gained, lost, strengthened or weakened."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

from em_circuits.analysis.aggregate import (
    _key_columns_of,
    _value_matrix,
    cluster_statistics,
    unpack_keys,
)

log = logging.getLogger(__name__)


CATEGORIES = ("gained", "lost", "strengthened", "weakened", "unchanged")


def compare_models(
    base: Mapping[str, pd.DataFrame],
    adapted: Mapping[str, pd.DataFrame],
    metric: str = "total",
    value: str = "contrast",
    threshold: float = 0.05,
    min_support: int = 2,
    ci_min_n: int = 3,
    n_perm: int = 9999,
    ci: float = 0.95,
    seed: int = 0,
    clusters: Mapping[str, str] | None = None,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Paired adapted - base differences of a per-prompt value, per feature key.

    Only prompts with a table for both models are used (paired); an absent key counts as 0
    in both (a gained feature changes the contrast from nothing). Keys present in fewer than
    ``min_support`` prompts in both models are dropped. ``threshold`` is in the value's units
    (logits). Clusters of prompts (``clusters``) are the units of the interval and the test
    of the difference (:func:`~em_circuits.analysis.aggregate.cluster_statistics`).
    Columns: layer, feature, [position], metric, n_prompts, n_clusters, support_base,
    support_adapted, mean_base, mean_adapted, mean_diff (over clusters), ci_low, ci_high,
    p_value, p_method, q_value,
    category (see :data:`CATEGORIES` and :data:`FORMULAS`), shift (toward_evil/toward_safe/none);
    sorted by mean_diff descending.
    """
    if not base or not adapted:
        raise ValueError("compare_models needs per-prompt tables of both models")
    keys = _key_columns_of({**base, **adapted})
    mb = _value_matrix(base, metric, value, keys)
    ma = _value_matrix(adapted, metric, value, keys)
    prompts = sorted(set(mb.prompts) & set(ma.prompts))
    dropped = sorted(set(mb.prompts) ^ set(ma.prompts))
    if dropped:
        log.warning(
            "base vs adapted: %d prompt(s) lack one model's table: %s",
            len(dropped),
            ", ".join(dropped[:5]),
        )
    packed = np.union1d(mb.packed, ma.packed)
    b, a = mb.aligned(packed, prompts), ma.aligned(packed, prompts)
    index = unpack_keys(packed, keys)
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
    stats = cluster_statistics(
        diff, np.ones_like(diff, dtype=bool), prompts, clusters, n_perm, seed, ci, alpha
    )
    table["n_clusters"] = stats["n_clusters"]
    table["mean_diff"] = stats["mean"] if n else np.nan
    for column in ("ci_low", "ci_high", "p_value", "p_method", "q_value"):
        table[column] = stats[column]
    either = (in_a | in_b).sum(axis=1)
    table["category"] = _categories(table, either, threshold, ci_min_n)
    table["shift"] = np.select(
        [table["mean_diff"] > 0, table["mean_diff"] < 0],
        ["toward_evil", "toward_safe"],
        default="none",
    )
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

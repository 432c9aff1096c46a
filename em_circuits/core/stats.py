"""Small, vectorised statistics for prompt-level feature effects.

The unit of every test here is the *prompt*: each row of an input matrix holds one feature's
per-prompt values, and the columns are prompts. Rows may have different numbers of values
(a feature is missing from some prompts), so the functions take ragged input as a list of 1-D
arrays and group rows of equal length to vectorise.

* :func:`cluster_rows` - per-unit values averaged within clusters (prompts that share a
  scenario are not independent: the cluster is the unit of every interval and test).
* :func:`t_mean_ci` - Student-t interval of the mean over the units (clusters).
* :func:`bootstrap_mean_ci` - percentile bootstrap CI of the mean (resampling units), seeded.
* :func:`sign_flip_test` - sign-flip permutation test of H0 "the values are symmetric around
  0" with the mean as statistic. Exact whenever every sign agrees (closed form), for n <= 16
  (all 2^n patterns) and, for n <= 40, wherever Monte Carlo finds p small (meet in the middle
  over two halves of the patterns); Monte Carlo with the (1 + hits) / (1 + draws) correction
  otherwise. Each p-value comes with its method; where n cannot reach alpha, no p-value.
* :func:`bh_qvalues` - Benjamini-Hochberg adjusted p-values (q-values); reject at level alpha
  exactly the hypotheses with q <= alpha.
* :func:`welch_t_rows` - Welch's t, used only for the *within-prompt* evil-vs-safe token
  comparison (its units are target tokens of one prompt, not prompts).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

#: Largest n for which the sign-flip test enumerates all 2^n sign patterns (65,536 at 16).
EXACT_MAX_N = 16
#: Largest n for which a small Monte Carlo p-value is replaced by the exact one (meet in the
#: middle: two sorted halves of 2^(n/2) partial sums, about 0.2 s per row at n = 40).
EXACT_REFINE_MAX_N = 40
#: Monte Carlo p-values at or below this are recomputed exactly (when n allows).
EXACT_REFINE_BELOW = 0.01
# Rows processed at once: bounds the (rows, draws) intermediate to ~tens of MB.
_CHUNK = 2048


def _groups_by_length(rows: Sequence[np.ndarray]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[len(row)].append(i)
    return groups


def row_means(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Each row's mean (NaN for an empty row), computed for all rows of one length at once:
    a table of a million feature keys otherwise makes a million calls."""
    means = np.full(len(rows), np.nan)
    for n, members in _groups_by_length(rows).items():
        if n:
            means[members] = np.stack([rows[i] for i in members]).mean(axis=1)
    return means


def bootstrap_mean_ci(
    rows: Sequence[np.ndarray],
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of each row's mean; rows are resampled with replacement.

    Rows with fewer than 2 values get their mean as both ends (no spread can be estimated
    from one prompt), and empty rows get NaN. For reproducibility the draws depend only on
    ``seed`` and the row length, not on the other rows.
    """
    low = np.full(len(rows), np.nan)
    high = np.full(len(rows), np.nan)
    alpha = (1.0 - ci) / 2.0
    for n, members in _groups_by_length(rows).items():
        if n == 0:
            continue
        values = np.stack([np.asarray(rows[i], dtype=np.float64) for i in members])
        if n == 1:
            low[members] = high[members] = values[:, 0]
            continue
        rng = np.random.default_rng([seed, n])
        # Multinomial counts per draw: mean_b = values @ counts_b / n, one matrix product.
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
        for start in range(0, len(members), _CHUNK):
            block = values[start : start + _CHUNK]
            means = block @ counts.T / n
            lo, hi = np.quantile(means, [alpha, 1.0 - alpha], axis=1)
            low[members[start : start + _CHUNK]] = lo
            high[members[start : start + _CHUNK]] = hi
    return low, high


def _sign_patterns(
    n: int, n_perm: int, rng: np.random.Generator, exact_max_n: int
) -> tuple[np.ndarray, bool]:
    """All 2^n sign patterns when small enough (exact test), else ``n_perm`` random ones."""
    if n <= exact_max_n:
        codes = np.arange(2**n)[:, None] >> np.arange(n)[None, :]
        return np.where(codes & 1, -1.0, 1.0), True
    return rng.choice(np.array([-1.0, 1.0]), size=(n_perm, n)), False


def cluster_rows(
    values: np.ndarray, used: np.ndarray, clusters: Sequence[str]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Each row's mean per cluster over its ``used`` entries; clusters with none are left out.

    ``values`` and ``used`` are (rows, units); ``clusters[j]`` names unit j's cluster. Returns
    the ragged per-row cluster means and the number of clusters per row.
    """
    names = sorted(set(clusters))
    member = np.zeros((len(clusters), len(names)))
    for j, name in enumerate(clusters):
        member[j, names.index(name)] = 1.0
    used = used.astype(np.float64)
    counts = used @ member  # (rows, clusters): used units per cluster
    sums = (np.where(used > 0, values, 0.0)) @ member
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    rows = [row[c > 0] for row, c in zip(means, counts)]
    return rows, (counts > 0).sum(axis=1)


def t_mean_ci(rows: Sequence[np.ndarray], ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Student-t interval of each row's mean (NaN for fewer than 2 values).

    With clusters as the units this is the usual cluster-robust interval for a mean; unlike
    the percentile bootstrap it does not shrink below nominal coverage at small n.
    """
    from scipy.stats import t as student_t

    low = np.full(len(rows), np.nan)
    high = np.full(len(rows), np.nan)
    for n, members in _groups_by_length(rows).items():
        if n < 2:
            continue
        values = np.stack([np.asarray(rows[i], dtype=np.float64) for i in members])
        half = student_t.ppf(0.5 + ci / 2, n - 1) * values.std(axis=1, ddof=1) / np.sqrt(n)
        mean = values.mean(axis=1)
        low[members], high[members] = mean - half, mean + half
    return low, high


def min_attainable_p(n: int, alternative: str = "two-sided") -> float:
    """The smallest sign-flip p-value n units can give (every sign agreeing)."""
    if n <= 0:
        return 1.0
    return (2.0 if alternative == "two-sided" else 1.0) / 2.0**n


def _half_sums(values: np.ndarray) -> np.ndarray:
    sums = np.zeros(1)
    for v in values:
        sums = np.concatenate([sums + v, sums - v])
    return sums


def exact_sign_flip_p(values: np.ndarray, alternative: str = "two-sided") -> float:
    """Exact sign-flip p-value of one sample by meet in the middle (n up to ~40).

    Counts the sign patterns s with sum(s * x) at least as extreme as the observed sum: the
    patterns of the first half give partial sums A, those of the second half sorted sums B,
    and each a in A counts the b in B beyond the threshold by binary search.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[x != 0]
    n = len(x)
    if n == 0:
        return 1.0
    observed = x.sum()
    tol = 1e-9 * np.abs(x).sum()
    first, second = _half_sums(x[: n // 2]), np.sort(_half_sums(x[n // 2 :]))
    if alternative == "two-sided":
        threshold = abs(observed) - tol
        if threshold <= 0:
            return 1.0
        upper = len(second) - np.searchsorted(second, threshold - first, side="left")
        lower = np.searchsorted(second, -threshold - first, side="right")
        hits = int(upper.sum() + lower.sum())
    elif alternative == "greater":
        hits = int((len(second) - np.searchsorted(second, observed - tol - first, "left")).sum())
    elif alternative == "less":
        hits = int(np.searchsorted(second, observed + tol - first, side="right").sum())
    else:
        raise ValueError(f"alternative must be two-sided, less or greater, not {alternative!r}")
    return min(hits / 2.0**n, 1.0)


def sign_flip_test(
    rows: Sequence[np.ndarray],
    n_perm: int = 9999,
    seed: int = 0,
    alternative: str = "two-sided",
    alpha: float | None = None,
    exact_max_n: int = EXACT_MAX_N,
    refine_max_n: int = EXACT_REFINE_MAX_N,
    refine_below: float = EXACT_REFINE_BELOW,
) -> tuple[np.ndarray, np.ndarray]:
    """Sign-flip p-value of each row's mean, and how it was computed.

    Methods: "exact" (all 2^n patterns, or meet in the middle where Monte Carlo found
    p <= ``refine_below`` and n <= ``refine_max_n``), "exact: all signs agree" (p = 2 / 2^n
    two-sided, 1 / 2^n one-sided in the agreeing direction, for any n), "monte carlo (N
    draws, resolution 1 / (N + 1))", "n too small" (with ``alpha``: the
    smallest attainable p exceeds alpha, so no p-value, NaN) and "no values" (p = 1).
    Zeros never change the statistic; they are dropped first (the p-value is the same).
    """
    rows = [np.asarray(r, dtype=np.float64) for r in rows]
    rows = [r[r != 0] for r in rows]
    p = sign_flip_pvalues(rows, n_perm, seed, exact_max_n, alternative)
    monte_carlo = f"monte carlo ({n_perm} draws, resolution {1 / (n_perm + 1):.1g})"
    method = np.array([monte_carlo] * len(rows), dtype=object)
    for i, row in enumerate(rows):
        n = len(row)
        if n == 0:
            method[i] = "no values"
            continue
        if alpha is not None and min_attainable_p(n, alternative) > alpha:
            p[i], method[i] = np.nan, "n too small"
            continue
        agree_pos, agree_neg = bool((row > 0).all()), bool((row < 0).all())
        if agree_pos or agree_neg:
            if alternative == "two-sided":
                p[i] = min_attainable_p(n, alternative)
            elif (alternative == "greater") == agree_pos:
                p[i] = min_attainable_p(n, alternative)
            else:
                p[i] = 1.0
            method[i] = "exact: all signs agree"
        elif n <= exact_max_n:
            method[i] = "exact"
        elif n <= refine_max_n and p[i] <= refine_below:
            p[i] = exact_sign_flip_p(row, alternative)
            method[i] = "exact"
    return p, method


def sign_flip_pvalues(
    rows: Sequence[np.ndarray],
    n_perm: int = 9999,
    seed: int = 0,
    exact_max_n: int = EXACT_MAX_N,
    alternative: str = "two-sided",
) -> np.ndarray:
    """Sign-flip permutation p-value of each row's mean (H0: symmetric around 0).

    ``alternative``: "two-sided" (|sum| as statistic), "less" (mean < 0) or "greater".

    Zeros do not change the statistic under any flip, so callers may drop them first (the
    p-value is the same). Exact p = #{patterns with |sum| >= |observed sum|} / 2^n, which
    counts the identity pattern; Monte Carlo p = (1 + hits) / (1 + n_perm), which is valid
    (never anti-conservative). The smallest attainable exact p is 2 / 2^n: with few prompts,
    no feature can be significant after FDR control, and that is the honest answer.
    Empty rows and all-zero rows get p = 1.
    """
    p = np.ones(len(rows))
    for n, members in _groups_by_length(rows).items():
        if n == 0:
            continue
        values = np.stack([np.asarray(rows[i], dtype=np.float64) for i in members])
        rng = np.random.default_rng([seed, n])
        signs, exact = _sign_patterns(n, n_perm, rng, exact_max_n)
        chunk = max(1, min(_CHUNK, (1 << 22) // signs.shape[0]))  # (rows, patterns) <= 32 MB
        for start in range(0, len(members), chunk):
            block = values[start : start + chunk]
            observed, null = _oriented(block.sum(axis=1), block @ signs.T, alternative)
            # Relative tolerance so the identity (and its mirror) always count as hits.
            tol = 1e-9 * np.maximum(np.abs(block).sum(axis=1), 1e-300)
            hits = (null >= (observed - tol)[:, None]).sum(axis=1)
            pv = hits / signs.shape[0] if exact else (1.0 + hits) / (1.0 + n_perm)
            pv[np.abs(block).sum(axis=1) <= 1e-300] = 1.0
            p[members[start : start + chunk]] = np.minimum(pv, 1.0)
    return p


def _oriented(
    observed: np.ndarray, null: np.ndarray, alternative: str
) -> tuple[np.ndarray, np.ndarray]:
    """Statistic and null so that "at least as extreme" is always ``null >= observed``."""
    if alternative == "two-sided":
        return np.abs(observed), np.abs(null)
    if alternative == "greater":
        return observed, null
    if alternative == "less":
        return -observed, -null
    raise ValueError(f"alternative must be two-sided, less or greater, not {alternative!r}")


def bh_qvalues(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg step-up adjusted p-values.

    q_(i) = min_{j >= i} m p_(j) / j over the p-values sorted ascending, capped at 1; NaN
    entries are not hypotheses (they keep NaN and do not count in m). Controls the false
    discovery rate at q for independent or positively dependent tests.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    valid = ~np.isnan(p)
    m = int(valid.sum())
    if m == 0:
        return q
    pv = p[valid]
    order = np.argsort(pv, kind="stable")
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(ranked, 1.0)
    q[valid] = adjusted
    return q


def welch_t_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise Welch t of mean(a) - mean(b) and its Welch-Satterthwaite degrees of freedom.

    ``a`` is (rows, n_a), ``b`` is (rows, n_b). NaN where a sample has fewer than 2 values or
    both variances are zero.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    rows = a.shape[0]
    if a.shape[1] < 2 or b.shape[1] < 2:
        return np.full(rows, np.nan), np.full(rows, np.nan)
    va = a.var(axis=1, ddof=1) / a.shape[1]
    vb = b.var(axis=1, ddof=1) / b.shape[1]
    se2 = va + vb
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (a.mean(axis=1) - b.mean(axis=1)) / np.sqrt(se2)
        df = se2**2 / (va**2 / (a.shape[1] - 1) + vb**2 / (b.shape[1] - 1))
    bad = se2 <= 0
    t[bad] = np.nan
    df[bad] = np.nan
    return t, df

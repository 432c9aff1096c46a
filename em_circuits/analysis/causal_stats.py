"""Statistics of the causal dose-response (:func:`em_circuits.analysis.causal.causal_validation`).

Every mean here is a mean of cluster means (prompts of one cluster averaged first), the same
unit the intervals and sign-flip tests use. The headline measure is ``delta_contrast``: the
change measured in the real model with nothing frozen (attention frozen only where the
transcoders cannot be intervened on outside circuit-tracer); ``delta_frozen``, the change with
attention frozen as attribution assumes, is summarised beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from em_circuits.analysis.aggregate import cluster_statistics
from em_circuits.core.stats import cluster_rows

#: What the dose table's measure columns hold.
UNFROZEN = "real model, nothing frozen"
FROZEN = "attention frozen (as attribution assumes)"


def cluster_mean(per_prompt: pd.Series, clusters: Mapping[str, str] | None) -> tuple[float, int]:
    """(mean of the cluster means, number of clusters) of per-prompt values (NaN dropped)."""
    values = per_prompt.dropna()
    if values.empty:
        return float("nan"), 0
    names = [clusters.get(str(p), str(p)) if clusters else str(p) for p in values.index]
    rows, counts = cluster_rows(
        values.to_numpy(dtype=np.float64)[None, :], np.ones((1, len(values)), bool), names
    )
    return float(rows[0].mean()), int(counts[0])


def dose_curve(dose: pd.DataFrame, clusters: Mapping[str, str] | None) -> list[dict[str, Any]]:
    """Per group and scale: the mean change of the contrast (cluster means; random draws
    averaged per prompt first), unfrozen and frozen, and the number of clusters."""
    out = []
    for (group, scale), rows in dose.groupby(["group", "scale"], sort=True):
        entry: dict[str, Any] = {"group": group, "scale": float(scale)}
        for column, name in (("delta_contrast", "mean"), ("delta_frozen", "mean_frozen")):
            if column in rows:
                mean, n = cluster_mean(rows.groupby("prompt_id")[column].mean(), clusters)
                entry[name] = None if np.isnan(mean) else mean
                entry["n_clusters"] = max(n, entry.get("n_clusters", 0))
        out.append(entry)
    return out


def _slope(curve: list[dict[str, Any]], group: str, key: str) -> float | None:
    points = [(c["scale"], c[key]) for c in curve if c["group"] == group and c.get(key) is not None]
    if len(points) < 2:
        return None
    scales, means = np.array(points, dtype=np.float64).T
    return float(np.polyfit(scales, means, 1)[0])


def ablation_test(
    dose: pd.DataFrame,
    column: str,
    alpha: float,
    ablation_scale: float,
    clusters: Mapping[str, str] | None,
) -> dict[str, Any] | None:
    """Top vs random features at the ablation scale on one measure column, paired per prompt
    (``paired_diff`` = delta(top) - mean over draws of delta(random)); one-sided sign-flip
    test over clusters of whether it is below 0. None when no prompt has both."""
    ablated = dose[np.isclose(dose["scale"], ablation_scale)]
    per_prompt = ablated.groupby(["prompt_id", "group"])[column].mean().unstack()
    if not {"top", "random"} <= set(per_prompt.columns):
        return None
    per_prompt = per_prompt.dropna()
    if per_prompt.empty:
        return None
    diff = per_prompt["top"] - per_prompt["random"]
    stats = cluster_statistics(
        diff.to_numpy()[None, :],
        np.ones((1, len(diff)), dtype=bool),
        [str(p) for p in per_prompt.index],
        clusters,
        alpha=alpha,
        alternative="less",
    )
    p = float(stats["p_value"][0])
    mean_diff = float(stats["mean"][0])
    return {
        "ablation_scale": ablation_scale,
        "n_paired_prompts": len(diff),
        "n_clusters": int(stats["n_clusters"][0]),
        "mean_delta_top": cluster_mean(per_prompt["top"], clusters)[0],
        "mean_delta_random": cluster_mean(per_prompt["random"], clusters)[0],
        "mean_paired_diff": mean_diff,
        "paired_diff_ci": [float(stats["ci_low"][0]), float(stats["ci_high"][0])],
        "prompts_top_lower": int((diff < 0).sum()),
        "p_value_one_sided": None if np.isnan(p) else p,
        "p_method": str(stats["p_method"][0]),
        "lowers_more_than_random": bool(mean_diff < 0 and not np.isnan(p) and p < alpha),
    }


def summarize(
    dose: pd.DataFrame,
    alpha: float = 0.05,
    ablation_scale: float = 0.0,
    clusters: Mapping[str, str] | None = None,
    measure: str = UNFROZEN,
) -> dict[str, Any]:
    """Ablation effect of top vs random features and dose-response slopes, clusters of
    prompts as the units. The headline keys (verdict, mean_delta_top, ...) are on
    ``delta_contrast``, measured as ``measure`` says; ``frozen_attention`` holds the same
    test on ``delta_frozen`` when that is a different measure."""
    out: dict[str, Any] = {
        "n_prompts": int(dose["prompt_id"].nunique()) if len(dose) else 0,
        "measure": measure,
    }
    unit = dose[np.isclose(dose["scale"], 1.0)]
    out["scale1_max_abs_delta"] = float(unit["delta_contrast"].abs().max()) if len(unit) else None
    curve = dose_curve(dose, clusters) if len(dose) else []
    out["dose_curve"] = curve
    out["slope_top"], out["slope_random"] = (
        _slope(curve, "top", "mean"),
        _slope(curve, "random", "mean"),
    )
    headline = ablation_test(dose, "delta_contrast", alpha, ablation_scale, clusters)
    if headline is None:
        out.update(
            verdict="no prompt had both top-feature and control interventions",
            lowers_more_than_random=None,
        )
        return out
    out.update(headline)
    if measure != FROZEN and "delta_frozen" in dose and dose["delta_frozen"].notna().any():
        frozen = ablation_test(dose, "delta_frozen", alpha, ablation_scale, clusters)
        if frozen is not None:
            frozen["measure"] = FROZEN
            frozen["slope_top"] = _slope(curve, "top", "mean_frozen")
            out["frozen_attention"] = frozen
    out["verdict"] = _verdict(out, alpha)
    return out


def _verdict(s: dict[str, Any], alpha: float) -> str:
    outcome = "lowered" if s["lowers_more_than_random"] else "did NOT significantly lower"
    p = s["p_value_one_sided"]
    test = (
        f"one-sided sign-flip p = {p:.3g} ({s['p_method']}, alpha {alpha})"
        if p is not None
        else f"no p-value: {s['n_clusters']} clusters cannot reach alpha {alpha}"
    )
    return (
        f"Ablating the top features ({s['measure']}) {outcome} the evil-minus-safe logit "
        f"contrast more than matched random features: mean change over "
        f"{s['n_clusters']} cluster means {s['mean_delta_top']:+.3g} (top) vs "
        f"{s['mean_delta_random']:+.3g} (random); top lower on {s['prompts_top_lower']} of "
        f"{s['n_paired_prompts']} prompts; {test}."
    )


def control_effect(
    dose: pd.DataFrame,
    scale: float,
    clusters: Mapping[str, str] | None,
    alternative: str,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """The top features' mean change of the contrast at one scale (``delta_contrast``, per
    prompt, clusters as units): a control in the base model (ablation: is the effect
    specific to the adapter? amplification: does evil rise?)."""
    rows = dose[(dose["group"] == "top") & np.isclose(dose["scale"], scale)]
    per_prompt = rows.groupby("prompt_id")["delta_contrast"].mean()
    if per_prompt.empty:
        return {"scale": scale, "n_prompts": 0}
    stats = cluster_statistics(
        per_prompt.to_numpy()[None, :],
        np.ones((1, len(per_prompt)), dtype=bool),
        [str(p) for p in per_prompt.index],
        clusters,
        alpha=alpha,
        alternative=alternative,
    )
    p = float(stats["p_value"][0])
    return {
        "scale": scale,
        "n_prompts": len(per_prompt),
        "n_clusters": int(stats["n_clusters"][0]),
        "mean_delta": float(stats["mean"][0]),
        "ci": [float(stats["ci_low"][0]), float(stats["ci_high"][0])],
        "alternative": alternative,
        "p_value": None if np.isnan(p) else p,
        "p_method": str(stats["p_method"][0]),
    }

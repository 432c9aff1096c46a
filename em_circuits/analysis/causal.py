"""Causal validation: do the top "evil" features move the evil-vs-safe logit contrast?

Attribution ranks features by a linearised effect. Here the adapted model itself is run with
circuit-tracer feature interventions: every active instance of the top features on a prompt
is set to ``scale * original activation`` (scale 0 = ablation, 1 = unchanged, > 1 =
amplification), and the change of the contrast

    contrast = mean_{e in evil} logit(e) - mean_{s in safe} logit(s)   (last position)

is compared with the same intervention on *matched random* features: for each top-feature
instance, a feature active on the same prompt, not in the top set, preferably at the same
position, with one of the ``pool`` closest activations (drawn at random, seeded). Several
draws give a control distribution. circuit-tracer zeroes features at position 0 (BOS), so no
instance there is ever used.

The summary answers one question plainly: does ablating the top features lower the contrast
more than ablating the random controls (paired per prompt, one-sided sign-flip test)?
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from em_circuits.analysis.aggregate import cluster_statistics
from em_circuits.analysis.effects import parse_position
from em_circuits.models.load import LoadedModel

log = logging.getLogger(__name__)

DEFAULT_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class Active:
    """The active feature instances of one prompt (position 0 excluded)."""

    layer: np.ndarray
    pos: np.ndarray
    feature: np.ndarray
    activation: np.ndarray

    def __len__(self) -> int:
        return len(self.layer)

    def interventions(
        self, index: Sequence[int | np.integer], scale: float
    ) -> list[tuple[int, int, int, float]]:
        """circuit-tracer interventions setting each chosen instance to scale * activation."""
        return [
            (
                int(self.layer[i]),
                int(self.pos[i]),
                int(self.feature[i]),
                float(scale * self.activation[i]),
            )
            for i in index
        ]


def top_evil_features(
    table: pd.DataFrame, k: int = 10, metric: str = "total"
) -> list[tuple[int, int]]:
    """The k (layer, feature) keys with the highest mean contrast effect in an
    :func:`~em_circuits.analysis.aggregate.aggregate_effects` table (duplicates over positions
    merged).
    """
    rows = table[table["metric"] == metric].sort_values("mean", ascending=False)
    keys: list[tuple[int, int]] = []
    for layer, feature in zip(rows["layer"], rows["feature"]):
        key = (int(layer), int(feature))
        if key not in keys:
            keys.append(key)
        if len(keys) == k:
            break
    return keys


def contrast_of(logits: torch.Tensor, evil_ids: Sequence[int], safe_ids: Sequence[int]) -> float:
    """mean evil logit - mean safe logit at the last position."""
    last = logits.reshape(-1, logits.shape[-1])[-1].float()
    return float(last[list(evil_ids)].mean() - last[list(safe_ids)].mean())


def active_instances(activations: torch.Tensor) -> Active:
    """Active (layer, pos, feature) entries of a (layers, pos, d_transcoder) activation cache."""
    acts = activations.coalesce() if activations.is_sparse else activations.to_sparse()
    index = acts.indices().cpu().numpy()
    values = acts.values().float().cpu().numpy()
    keep = (values > 0) & (index[1] > 0)  # circuit-tracer zeroes BOS features anyway
    return Active(index[0][keep], index[1][keep], index[2][keep], values[keep])


def _allowed_positions(active: Active, n_pos: int, position: str) -> np.ndarray:
    spec = parse_position(position)
    if spec.mode == "rel":
        if spec.offset is None:  # parse_position always sets it for "rel"
            raise ValueError(f"position {position!r}: a relative position needs an offset")
        return active.pos == n_pos + spec.offset
    return np.ones(len(active), bool)


def matched_controls(
    active: Active,
    top: np.ndarray,
    excluded: np.ndarray,
    n_draws: int,
    rng: np.random.Generator,
    pool: int = 8,
) -> list[list[int]]:
    """For each draw, one control instance per top instance (indices into ``active``).

    Candidates exclude ``excluded`` (every instance of a top (layer, feature) key, at any
    position) and instances already drawn; same-position candidates come first (an
    early-position feature reaches the last logit only through attention, so it would be a
    weak control), then the closest activation; the control is drawn uniformly from the
    first ``pool``. A draw is shorter than ``top`` only if candidates run out.
    """
    eligible = ~excluded
    eligible[top] = False
    draws = []
    for _ in range(n_draws):
        free = eligible.copy()
        chosen = []
        for i in sorted(top, key=lambda j: -active.activation[j]):
            candidates = np.flatnonzero(free)
            if len(candidates) == 0:
                break
            distance = np.abs(active.activation[candidates] - active.activation[i])
            order = np.lexsort((distance, active.pos[candidates] != active.pos[i]))
            pick = candidates[order[rng.integers(min(pool, len(order)))]]
            free[pick] = False
            chosen.append(int(pick))
        draws.append(chosen)
    return draws


def _intervention_input(
    model: LoadedModel, ids: torch.Tensor, text: str, freeze_attention: bool
) -> torch.Tensor | str:
    """The input circuit-tracer's intervention accepts.

    Without frozen attention, circuit-tracer 0.5 counts positions by re-tokenizing the input
    and fails on token ids; the text is then passed, but only if it tokenizes to the very ids
    the attribution used (else the positions of the interventions would be wrong).
    """
    if freeze_attention:
        return ids
    if model.tokenizer(text).input_ids != ids.tolist():
        raise ValueError(
            "freeze_attention=False needs the prompt text to tokenize exactly as "
            "model.encode does (circuit-tracer re-tokenizes it); use freeze_attention=True"
        )
    return text


@torch.no_grad()
def _intervened_contrast(
    model: LoadedModel,
    ids: torch.Tensor | str,
    interventions: list[tuple[int, int, int, float]],
    evil_ids: Sequence[int],
    safe_ids: Sequence[int],
    freeze_attention: bool,
) -> float:
    logits, _ = model.replacement.feature_intervention(
        ids, interventions, freeze_attention=freeze_attention, return_activations=False
    )
    return contrast_of(logits, evil_ids, safe_ids)


def _prompt_rows(
    model: LoadedModel,
    prompt: dict[str, Any],
    top_keys: set[tuple[int, int]],
    scales: Sequence[float],
    n_random: int,
    rng: np.random.Generator,
    position: str,
    freeze_attention: bool,
    pool: int,
) -> list[dict[str, Any]]:
    ids = model.encode_prompt(dict(prompt))
    evil, safe = prompt["evil_ids"], prompt["safe_ids"]
    with torch.no_grad():
        logits, acts = model.replacement.get_activations(ids, sparse=True)
    inputs = _intervention_input(model, ids, model.render(dict(prompt)), freeze_attention)
    baseline = contrast_of(logits, evil, safe)
    active = active_instances(acts)
    is_top = np.array(
        [(int(la), int(f)) in top_keys for la, f in zip(active.layer, active.feature)], dtype=bool
    )
    top = np.flatnonzero(is_top & _allowed_positions(active, len(ids), position))
    if len(top) == 0:
        log.info("prompt %s: no top feature is active; skipped", prompt["prompt_id"])
        return []
    draws = matched_controls(active, top, is_top, n_random, rng, pool)
    groups = [("top", -1, list(top))] + [("random", d, idx) for d, idx in enumerate(draws)]
    rows = []
    for group, draw, index in groups:
        for scale in scales:
            value = _intervened_contrast(
                model, inputs, active.interventions(index, scale), evil, safe, freeze_attention
            )
            rows.append(
                {
                    "prompt_id": prompt["prompt_id"],
                    "group": group,
                    "draw": draw,
                    "scale": float(scale),
                    "n_features": len(index),
                    "activation_sum": float(active.activation[index].sum()),
                    "baseline": baseline,
                    "contrast": value,
                    "delta_contrast": value - baseline,
                }
            )
    return rows


def causal_validation(
    model: LoadedModel,
    prompts: list[dict[str, Any]],
    top_features: list[tuple[int, int]],
    scales: Sequence[float] = DEFAULT_SCALES,
    n_random: int = 5,
    seed: int = 0,
    position: str = "any",
    freeze_attention: bool = True,
    pool: int = 8,
    alpha: float = 0.05,
    clusters: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Dose-response of the contrast under interventions on the top features vs random ones.

    ``prompts``: dicts with prompt_id, text, evil_ids, safe_ids. ``top_features``: (layer,
    transcoder feature id) keys; on each prompt all their active instances at the allowed
    positions (``position``: any, last, rel:-k) are scaled together. ``freeze_attention``
    keeps attention patterns at their clean values, as attribution does (circuit-tracer's
    default); False lets patterns change too.

    Returns the dose table (prompt_id, group top|random, draw (-1 for top), scale,
    n_features, activation_sum, baseline, contrast, delta_contrast) and a summary dict.
    """
    rng = np.random.default_rng(seed)
    top_keys = {(int(layer), int(feature)) for layer, feature in top_features}
    rows: list[dict[str, Any]] = []
    skipped = []
    for prompt in prompts:
        prompt_rows = _prompt_rows(
            model, prompt, top_keys, scales, n_random, rng, position, freeze_attention, pool
        )
        if not prompt_rows:
            skipped.append(prompt["prompt_id"])
        rows.extend(prompt_rows)
    columns = [
        "prompt_id",
        "group",
        "draw",
        "scale",
        "n_features",
        "activation_sum",
        "baseline",
        "contrast",
        "delta_contrast",
    ]
    dose = pd.DataFrame.from_records(rows, columns=columns)
    summary = summarize(dose, alpha=alpha, clusters=clusters)
    summary.update(
        top_features=[list(key) for key in sorted(top_keys)],
        scales=[float(s) for s in scales],
        n_random=n_random,
        seed=seed,
        position=position,
        freeze_attention=freeze_attention,
        pool=pool,
        skipped_prompts=skipped,
        model_fingerprint=model.fingerprint,
    )
    return dose, summary


def summarize(
    dose: pd.DataFrame,
    alpha: float = 0.05,
    ablation_scale: float = 0.0,
    clusters: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Ablation effect of top vs random features, paired per prompt, and dose-response slopes.

    ``paired_diff`` per prompt = delta(top) - mean over draws of delta(random) at the
    ablation scale; the one-sided sign-flip test asks whether it is below 0 (the top
    features lower the contrast more than matched random ones), clusters of prompts as units.
    """
    out: dict[str, Any] = {"n_prompts": int(dose["prompt_id"].nunique()) if len(dose) else 0}
    unit = dose[np.isclose(dose["scale"], 1.0)]
    out["scale1_max_abs_delta"] = float(unit["delta_contrast"].abs().max()) if len(unit) else None
    slopes = {}
    for group in ("top", "random"):
        curve = dose[dose["group"] == group].groupby("scale")["delta_contrast"].mean()
        slopes[group] = (
            float(np.polyfit(curve.index, curve.values, 1)[0]) if len(curve) > 1 else None
        )
    out["slope_top"], out["slope_random"] = slopes["top"], slopes["random"]
    ablated = dose[np.isclose(dose["scale"], ablation_scale)]
    per_prompt = ablated.groupby(["prompt_id", "group"])["delta_contrast"].mean().unstack()
    per_prompt = per_prompt.dropna() if {"top", "random"} <= set(per_prompt.columns) else None
    if per_prompt is None or per_prompt.empty:
        out.update(
            verdict="no prompt had both top-feature and control interventions",
            lowers_more_than_random=None,
        )
        return out
    diff = (per_prompt["top"] - per_prompt["random"]).to_numpy()
    prompts = [str(p) for p in per_prompt.index]
    stats = cluster_statistics(
        diff[None, :],
        np.ones((1, len(diff)), dtype=bool),
        prompts,
        clusters,
        alpha=alpha,
        alternative="less",
    )
    p = float(stats["p_value"][0])
    out.update(
        ablation_scale=ablation_scale,
        n_paired_prompts=len(diff),
        n_clusters=int(stats["n_clusters"][0]),
        mean_delta_top=float(per_prompt["top"].mean()),
        mean_delta_random=float(per_prompt["random"].mean()),
        mean_paired_diff=float(diff.mean()),
        paired_diff_ci=[float(stats["ci_low"][0]), float(stats["ci_high"][0])],
        prompts_top_lower=int((diff < 0).sum()),
        p_value_one_sided=None if np.isnan(p) else p,
        p_method=str(stats["p_method"][0]),
        lowers_more_than_random=bool(diff.mean() < 0 and not np.isnan(p) and p < alpha),
    )
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
        f"Ablating the top features {outcome} the evil-minus-safe logit contrast more than "
        f"matched random features: mean change {s['mean_delta_top']:+.3f} (top) vs "
        f"{s['mean_delta_random']:+.3f} (random); top lower on {s['prompts_top_lower']} of "
        f"{s['n_paired_prompts']} prompts in {s['n_clusters']} clusters; {test}."
    )


def control_effect(
    dose: pd.DataFrame,
    scale: float,
    clusters: Mapping[str, str] | None,
    alternative: str,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """The top features' mean change of the contrast at one scale (per prompt, clusters as
    units): a control in the base model (ablation: is the effect specific to the adapter?
    amplification: does evil rise?)."""
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


# -- measured effects of single features, next to their linearised effects -----------------------
def measured_ablation_effects(
    model: LoadedModel,
    prompts: list[dict[str, Any]],
    features: Sequence[tuple[int, int]],
    position: str = "any",
) -> pd.DataFrame:
    """Each feature ablated alone on each prompt: the change of the contrast measured with
    attention frozen (circuit-tracer's intervention, as attribution assumes) and in the real
    model with nothing frozen (:func:`~em_circuits.analysis.intervene.real_model_logits`).

    Columns: prompt_id, layer, feature, n_instances (active instances ablated; 0 when the
    feature is not active there, and then both changes are exactly 0), activation_sum,
    baseline, delta_frozen, delta_unfrozen (NaN when the transcoders cannot be intervened on
    outside circuit-tracer).
    """
    from em_circuits.analysis.intervene import real_model_logits, unsupported_reason

    unsupported = unsupported_reason(model)
    if unsupported is not None:
        log.warning("measured effects with nothing frozen are not available: %s", unsupported)
    rows = []
    for number, prompt in enumerate(prompts, 1):
        log.info(
            "measured ablations: prompt %d/%d, %d features", number, len(prompts), len(features)
        )
        ids = model.encode_prompt(dict(prompt))
        evil, safe = prompt["evil_ids"], prompt["safe_ids"]
        with torch.no_grad():
            logits, acts = model.replacement.get_activations(ids, sparse=True)
        baseline = contrast_of(logits, evil, safe)
        active = active_instances(acts)
        allowed = _allowed_positions(active, len(ids), position)
        real_baseline: float | None = None
        if unsupported is None:
            real_baseline = contrast_of(real_model_logits(model, ids, []), evil, safe)
        for layer, feature in features:
            index = np.flatnonzero(
                (active.layer == layer) & (active.feature == feature) & allowed
            ).tolist()
            row = {
                "prompt_id": prompt["prompt_id"],
                "layer": int(layer),
                "feature": int(feature),
                "n_instances": len(index),
                "activation_sum": float(active.activation[index].sum()) if index else 0.0,
                "baseline": baseline,
                "delta_frozen": 0.0,
                "delta_unfrozen": 0.0 if real_baseline is not None else np.nan,
            }
            if index:
                ablate = active.interventions(index, 0.0)
                row["delta_frozen"] = (
                    _intervened_contrast(model, ids, ablate, evil, safe, freeze_attention=True)
                    - baseline
                )
                if real_baseline is not None:
                    changed = real_model_logits(model, ids, ablate)
                    row["delta_unfrozen"] = contrast_of(changed, evil, safe) - real_baseline
            rows.append(row)
    return pd.DataFrame.from_records(
        rows,
        columns=[
            "prompt_id",
            "layer",
            "feature",
            "n_instances",
            "activation_sum",
            "baseline",
            "delta_frozen",
            "delta_unfrozen",
        ],
    )


def with_linearised(measured: pd.DataFrame, effects: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Add each (prompt, feature)'s linearised total effect on the contrast (from its graph;
    0 where the feature is not in it) and the ablation change it predicts (its negative)."""
    lookup = {}
    for pid, frame in effects.items():
        rows = frame[frame["metric"] == "total"]
        grouped = rows.groupby(["layer", "feature"])["contrast"].sum()
        for (layer, feature), value in grouped.items():
            lookup[(pid, int(layer), int(feature))] = float(value)
    out = measured.copy()
    out["linearised_total"] = [
        lookup.get((p, int(la), int(f)), 0.0)
        for p, la, f in zip(out["prompt_id"], out["layer"], out["feature"])
    ]
    out["linearised_delta"] = -out["linearised_total"]
    return out


def agreement(table: pd.DataFrame, measured: str) -> dict[str, Any]:
    """How well the linearised ablation change predicts a measured one, over the (prompt,
    feature) pairs where the feature is active: Pearson r, the median ratio measured /
    linearised, the share with the same sign, and n."""
    rows = table[(table["n_instances"] > 0) & table[measured].notna()]
    predicted, observed = rows["linearised_delta"].to_numpy(), rows[measured].to_numpy()
    out: dict[str, Any] = {"n_pairs": len(rows)}
    if len(rows) < 3 or np.std(predicted) == 0 or np.std(observed) == 0:
        return {**out, "pearson_r": None, "median_ratio": None, "same_sign": None}
    usable = np.abs(predicted) > 1e-6
    out["pearson_r"] = float(np.corrcoef(predicted, observed)[0, 1])
    out["median_ratio"] = (
        float(np.median(observed[usable] / predicted[usable])) if usable.any() else None
    )
    out["same_sign"] = float(np.mean(np.sign(predicted) == np.sign(observed)))
    return out


def rank_by_measured(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per feature: mean measured and linearised ablation change over the prompts (0 where
    inactive), most evil-promoting first (the most negative measured change)."""
    per_feature = (
        table.groupby(["layer", "feature"])
        .agg(
            n_prompts=("prompt_id", "nunique"),
            n_active=("n_instances", lambda s: int((s > 0).sum())),
            measured_delta=(column, "mean"),
            linearised_delta=("linearised_delta", "mean"),
        )
        .reset_index()
    )
    return per_feature.sort_values("measured_delta", kind="stable", ignore_index=True)

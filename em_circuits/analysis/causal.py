"""Causal validation: do the top "evil" features move the evil-vs-safe logit contrast?

Attribution ranks features by a linearised effect. Here the adapted model itself is run with
feature interventions: every active instance of the top features on a prompt is set to
``scale * original activation`` (scale 0 = ablation, 1 = unchanged, > 1 = amplification), and
the change of the contrast

    contrast = mean_{e in evil} logit(e) - mean_{s in safe} logit(s)   (last position)

is measured in the real model with nothing frozen (the headline) and, beside it, with
attention frozen as attribution assumes (circuit-tracer's intervention). It is compared with
the same intervention on *matched random* features: for each top-feature instance, a feature
active on the same prompt, not in the top set, preferably at the same position, with one of
the ``pool`` closest activations (drawn at random, seeded). Several draws give a control
distribution. circuit-tracer zeroes features at position 0 (BOS), so no instance there is
ever used.

The summary answers one question plainly: does ablating the top features lower the contrast
more than ablating the random controls (paired per prompt, one-sided sign-flip test over
clusters; every mean a mean of cluster means)?
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from em_circuits.analysis.causal_stats import (  # noqa: F401  (summarize, control_effect: re-exported)
    FROZEN,
    UNFROZEN,
    control_effect,
    summarize,
)
from em_circuits.analysis.effects import parse_position
from em_circuits.core.progress import Progress
from em_circuits.models.hooks import Intervention, real_model_last_logits, unsupported_reason
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


def allowed_positions(active: Active, n_pos: int, position: str) -> np.ndarray:
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


def set_contrasts(
    model: LoadedModel,
    ids: torch.Tensor,
    sets: list[list[Intervention]],
    prompt: dict[str, Any],
    *,
    freeze_attention: bool,
    batched: bool,
) -> list[float]:
    """The contrast under each intervention set (the first: none, the clean run): several
    sets per forward pass of the real model where its transcoders can be hooked
    (``batched``), else circuit-tracer's intervention one set at a time (attention frozen)."""
    evil, safe = prompt["evil_ids"], prompt["safe_ids"]
    if batched:
        last = real_model_last_logits(model, ids, sets, freeze_attention=freeze_attention)
        return [contrast_of(row, evil, safe) for row in last]
    if not freeze_attention:
        raise ValueError("without hooks on the real model only frozen interventions run")
    with torch.no_grad():
        clean, _ = model.replacement.get_activations(ids, sparse=True)
    return [contrast_of(clean, evil, safe)] + [
        _intervened_contrast(model, ids, changes, evil, safe, freeze_attention=True)
        for changes in sets[1:]
    ]


#: The dose table's columns: the headline measure (``baseline``, ``contrast``,
#: ``delta_contrast``: the real model, nothing frozen, where supported) and beside it the same
#: intervention with attention frozen (``*_frozen``), as attribution assumes.
DOSE_COLUMNS = [
    "prompt_id",
    "group",
    "draw",
    "scale",
    "n_features",
    "activation_sum",
    "baseline",
    "contrast",
    "delta_contrast",
    "baseline_frozen",
    "contrast_frozen",
    "delta_frozen",
]


def _prompt_rows(
    model: LoadedModel,
    prompt: dict[str, Any],
    top_keys: set[tuple[int, int]],
    scales: Sequence[float],
    n_random: int,
    rng: np.random.Generator,
    position: str,
    pool: int,
    unfrozen: bool,
) -> list[dict[str, Any]]:
    ids = model.encode_prompt(dict(prompt))
    with torch.no_grad():
        _, acts = model.replacement.get_activations(ids, sparse=True)
    active = active_instances(acts)
    is_top = np.array(
        [(int(la), int(f)) in top_keys for la, f in zip(active.layer, active.feature)], dtype=bool
    )
    top = np.flatnonzero(is_top & allowed_positions(active, len(ids), position))
    if len(top) == 0:
        return []
    draws = matched_controls(active, top, is_top, n_random, rng, pool)
    groups = [("top", -1, list(top))] + [("random", d, idx) for d, idx in enumerate(draws)]
    rows: list[dict[str, Any]] = []
    sets: list[list[Intervention]] = [[]]  # the clean run first
    for group, draw, index in groups:
        for scale in scales:
            sets.append(active.interventions(index, scale))
            rows.append(
                {
                    "prompt_id": prompt["prompt_id"],
                    "group": group,
                    "draw": draw,
                    "scale": float(scale),
                    "n_features": len(index),
                    "activation_sum": float(active.activation[index].sum()),
                }
            )
    frozen = set_contrasts(model, ids, sets, prompt, freeze_attention=True, batched=unfrozen)
    real = (
        set_contrasts(model, ids, sets, prompt, freeze_attention=False, batched=True)
        if unfrozen
        else frozen
    )
    for row, value, value_frozen in zip(rows, real[1:], frozen[1:]):
        row.update(
            baseline=real[0],
            contrast=value,
            delta_contrast=value - real[0],
            baseline_frozen=frozen[0],
            contrast_frozen=value_frozen,
            delta_frozen=value_frozen - frozen[0],
        )
    return rows


def prompt_rng(seed: int, prompt_id: str) -> np.random.Generator:
    """A prompt's own random draws: the same whichever prompts come before it and whichever
    process of a launch measures it."""
    return np.random.default_rng([seed, zlib.crc32(prompt_id.encode("utf-8"))])


def dose_rows(
    model: LoadedModel,
    prompt: dict[str, Any],
    top_features: Sequence[tuple[int, int]],
    scales: Sequence[float] = DEFAULT_SCALES,
    n_random: int = 5,
    seed: int = 0,
    position: str = "any",
    pool: int = 8,
) -> list[dict[str, Any]]:
    """One prompt's rows of the dose table (:data:`DOSE_COLUMNS`; none when no top feature
    is active there): see :func:`causal_validation`."""
    top_keys = {(int(layer), int(feature)) for layer, feature in top_features}
    rng = prompt_rng(seed, prompt["prompt_id"])
    unfrozen = unsupported_reason(model) is None
    return _prompt_rows(model, prompt, top_keys, scales, n_random, rng, position, pool, unfrozen)


def causal_validation(
    model: LoadedModel,
    prompts: list[dict[str, Any]],
    top_features: list[tuple[int, int]],
    scales: Sequence[float] = DEFAULT_SCALES,
    n_random: int = 5,
    seed: int = 0,
    position: str = "any",
    pool: int = 8,
    alpha: float = 0.05,
    clusters: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Dose-response of the contrast under interventions on the top features vs random ones.

    ``prompts``: dicts with prompt_id, text, evil_ids, safe_ids. ``top_features``: (layer,
    transcoder feature id) keys; on each prompt all their active instances at the allowed
    positions (``position``: any, last, rel:-k) are scaled together. Each intervention is
    measured twice: in the real model with nothing frozen
    (:func:`~em_circuits.models.hooks.real_model_logits`; the headline ``delta_contrast``)
    and with attention frozen as attribution assumes (circuit-tracer's intervention;
    ``delta_frozen``). Where the transcoders cannot be intervened on outside circuit-tracer
    the headline is the frozen figure, and the summary's ``measure`` says so. Each prompt's
    random controls are drawn from its own generator (:func:`prompt_rng`).

    Returns the dose table (:data:`DOSE_COLUMNS`; draw -1 for top) and a summary dict
    (:func:`~em_circuits.analysis.causal_stats.summarize`: cluster means).
    """
    unsupported = unsupported_reason(model)
    if unsupported is not None:
        log.warning("causal check with attention frozen only: %s", unsupported)
    per_prompt = []
    progress = Progress("causal check: prompts", len(prompts), logger=log)
    for prompt in prompts:
        per_prompt.append(
            dose_rows(model, prompt, top_features, scales, n_random, seed, position, pool)
        )
        progress.step()
    progress.finish()
    return dose_summary(
        model,
        prompts,
        per_prompt,
        top_features,
        scales,
        n_random,
        seed,
        position,
        pool,
        alpha=alpha,
        clusters=clusters,
    )


def dose_summary(
    model: LoadedModel,
    prompts: list[dict[str, Any]],
    per_prompt: list[list[dict[str, Any]]],
    top_features: Sequence[tuple[int, int]],
    scales: Sequence[float],
    n_random: int,
    seed: int,
    position: str,
    pool: int = 8,
    *,
    alpha: float = 0.05,
    clusters: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The dose table and summary of :func:`causal_validation` from each prompt's
    :func:`dose_rows` (in the order of ``prompts``)."""
    unsupported = unsupported_reason(model)
    rows = [row for prompt_rows in per_prompt for row in prompt_rows]
    skipped = [prompt["prompt_id"] for prompt, found in zip(prompts, per_prompt) if not found]
    for prompt_id in skipped:
        log.info("prompt %s: no top feature is active; skipped", prompt_id)
    dose = pd.DataFrame.from_records(rows, columns=DOSE_COLUMNS)
    measure = UNFROZEN if unsupported is None else f"{FROZEN}; unfrozen: {unsupported}"
    summary = summarize(dose, alpha=alpha, clusters=clusters, measure=measure)
    summary.update(
        top_features=[list(key) for key in sorted({(int(la), int(f)) for la, f in top_features})],
        scales=[float(s) for s in scales],
        n_random=n_random,
        seed=seed,
        position=position,
        pool=pool,
        skipped_prompts=skipped,
        model_fingerprint=model.fingerprint,
    )
    return dose, summary

"""Measured effects of single features, next to their linearised effects.

Each candidate feature is ablated alone on each prompt and the change of the contrast is
measured twice: with attention frozen (as attribution assumes) and in the real model with
nothing frozen. :func:`with_linearised` puts the attribution's linearised effect beside
each, :func:`agreement` says how well they agree and :func:`rank_by_measured` ranks the
features by what was measured.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from em_circuits.analysis.causal import (
    active_instances,
    allowed_positions,
    contrast_of,
    set_contrasts,
)
from em_circuits.core.progress import Progress
from em_circuits.models.hooks import Intervention, unsupported_reason
from em_circuits.models.load import LoadedModel

log = logging.getLogger(__name__)

#: The columns of :func:`measured_ablation_effects`' table.
MEASURED_COLUMNS = [
    "prompt_id",
    "layer",
    "feature",
    "n_instances",
    "activation_sum",
    "baseline",
    "delta_frozen",
    "delta_unfrozen",
]


def measured_ablation_effects(
    model: LoadedModel,
    prompts: list[dict[str, Any]],
    features: Sequence[tuple[int, int]],
    position: str = "any",
) -> pd.DataFrame:
    """Each feature ablated alone on each prompt: the change of the contrast measured with
    attention frozen (circuit-tracer's intervention, as attribution assumes) and in the real
    model with nothing frozen (:func:`~em_circuits.models.hooks.real_model_logits`).

    Columns: prompt_id, layer, feature, n_instances (active instances ablated; 0 when the
    feature is not active there, and then both changes are exactly 0), activation_sum,
    baseline, delta_frozen, delta_unfrozen (NaN when the transcoders cannot be intervened on
    outside circuit-tracer).
    """
    unsupported = unsupported_reason(model)
    if unsupported is not None:
        log.warning("measured effects with nothing frozen are not available: %s", unsupported)
    rows = []
    progress = Progress("measured ablations", len(prompts) * len(features), logger=log)
    for number, prompt in enumerate(prompts, 1):
        log.info(
            "measured ablations: prompt %d/%d, %d features", number, len(prompts), len(features)
        )
        ids = model.encode_prompt(dict(prompt))
        with torch.no_grad():
            logits, acts = model.replacement.get_activations(ids, sparse=True)
        baseline = contrast_of(logits, prompt["evil_ids"], prompt["safe_ids"])
        active = active_instances(acts)
        allowed = allowed_positions(active, len(ids), position)
        found: list[dict[str, Any]] = []
        sets: list[list[Intervention]] = [[]]  # the clean run first
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
                "delta_unfrozen": 0.0 if unsupported is None else np.nan,
            }
            if index:
                found.append(row)
                sets.append(active.interventions(index, 0.0))
            rows.append(row)
            progress.step()
        if not found:
            continue
        # every ablation of the prompt beside its clean run, several per forward pass
        batched = unsupported is None
        frozen = set_contrasts(model, ids, sets, prompt, freeze_attention=True, batched=batched)
        real = (
            set_contrasts(model, ids, sets, prompt, freeze_attention=False, batched=True)
            if batched
            else None
        )
        for i, row in enumerate(found, 1):
            row["delta_frozen"] = frozen[i] - frozen[0]
            if real is not None:
                row["delta_unfrozen"] = real[i] - real[0]
    progress.finish()
    return pd.DataFrame.from_records(rows, columns=MEASURED_COLUMNS)


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

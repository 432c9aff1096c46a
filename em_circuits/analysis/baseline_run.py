"""The baselines step's computation: every method's edit, measured on the validation prompts.

See :mod:`em_circuits.analysis.baselines` for the methods. Besides the table, what the tested
features add over the mean-diff subspace: how much of the subspace their decoder vectors span,
the subspace's effect with their span projected out of it (and theirs with the subspace
projected out), and how many positions each edit touches.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from em_circuits.analysis.baseline_methods import COLUMNS, METHODS
from em_circuits.analysis.baselines import (
    Edit,
    Key,
    change_statistics,
    choose_site,
    contrast_changes,
    feature_edit_sizes,
    features_edit,
    matched_random,
    mean_diff_subspaces,
    mean_feature_activations,
    misalignment_directions,
    projection_edit,
    projection_sizes,
    real_contrast,
    top_activation_diff,
)
from em_circuits.analysis.directions import cosines, n_sites, orthonormal, span_share, without_span
from em_circuits.core.progress import Progress
from em_circuits.models.hooks import transcoder_set
from em_circuits.models.load import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class BaselineInputs:
    """What the methods are computed from."""

    discovery: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    clusters: Mapping[str, str]
    tested: list[Key]
    linearised: list[Key]
    measured: list[Key]
    ranked: pd.DataFrame  # the ranking's total-effect rows (layer, feature, mean_activation)
    excluded: set[Key]  # never drawn as random features
    corpus: list[str] | None
    n_perm: int = 9999
    seed: int = 0
    random_draws: int = 3


@dataclass
class BaselineResult:
    table: pd.DataFrame
    overlap: pd.DataFrame
    summary: dict[str, Any]
    edits: dict[str, list[Edit]] = field(default_factory=dict)
    directions: dict[str, np.ndarray] = field(default_factory=dict)


def decoder_vectors(model: LoadedModel, keys: Sequence[Key]) -> np.ndarray:
    """The decoder rows (d_model) of these transcoder features."""
    transcoders = transcoder_set(model)
    rows = [
        transcoders[layer]._get_decoder_vectors(torch.tensor([feature]))[0].float().cpu().numpy()
        for layer, feature in keys
    ]
    return np.asarray(rows, np.float64)


def _directions(
    base: LoadedModel, adapted: LoadedModel, inputs: BaselineInputs, clean: list[float]
) -> dict[str, Any]:
    """The mean-diff subspace and the misalignment direction, each at its chosen site."""
    sites = list(range(n_sites(adapted)))
    k = len(inputs.tested)
    subspaces = mean_diff_subspaces(base, adapted, inputs.discovery, sites, k)
    sub_site, sub_changes = choose_site(adapted, inputs.discovery, subspaces, clean)
    directions, grouping = misalignment_directions(adapted, inputs.discovery, sites)
    mis_site, mis_changes = choose_site(adapted, inputs.discovery, directions, clean)
    return {
        "subspace": subspaces.get(sub_site) if sub_site is not None else None,
        "subspace_site": sub_site,
        "subspace_discovery_changes": sub_changes,
        "direction": directions.get(mis_site) if mis_site is not None else None,
        "direction_site": mis_site,
        "direction_discovery_changes": mis_changes,
        "grouping": grouping,
    }


def _feature_sets(
    base: LoadedModel, adapted: LoadedModel, inputs: BaselineInputs
) -> tuple[dict[str, list[list[Key]]], dict[str, Any]]:
    """Each feature method's feature sets (several draws for the random features)."""
    k = len(inputs.tested)
    sets: dict[str, list[list[Key]]] = {
        "tested_features": [inputs.tested],
        "linearised_top_features": [inputs.linearised[:k]],
        "measured_top_features": [inputs.measured[:k]],
    }
    notes: dict[str, Any] = {}
    if inputs.corpus:
        base_means = mean_feature_activations(base, inputs.corpus)
        adapted_means = mean_feature_activations(adapted, inputs.corpus)
        sets["activation_diff_features"] = [top_activation_diff(base_means, adapted_means, k)]
        notes["activation_diff_corpus_docs"] = len(inputs.corpus)
    else:
        notes["activation_diff_features"] = "no corpus (give --corpus)"
    draws = matched_random(
        inputs.tested, inputs.ranked, inputs.excluded, inputs.seed, inputs.random_draws
    )
    if draws and all(draws):
        sets["random_features"] = draws
    return sets, notes


def run_baselines(
    base: LoadedModel, adapted: LoadedModel, inputs: BaselineInputs
) -> BaselineResult:
    """Every method measured on the validation prompts (contrast changes with statistics),
    the overlap of the tested features with the subspace, and the edits' sizes."""
    k = len(inputs.tested)
    clean = {
        side: [real_contrast(adapted, p) for p in prompts]
        for side, prompts in (("discovery", inputs.discovery), ("validation", inputs.validation))
    }
    found = _directions(base, adapted, inputs, clean["discovery"])
    feature_sets, notes = _feature_sets(base, adapted, inputs)
    validation, ids = inputs.validation, [p["prompt_id"] for p in inputs.validation]
    n_positions = [len(adapted.encode_prompt(dict(p))) - 1 for p in validation]
    rows: list[dict[str, Any]] = []
    sizes: dict[str, Any] = {}
    edits: dict[str, list[Edit]] = {}
    progress = Progress("baselines: edited prompts measured", logger=log)
    for method in METHODS:
        row: dict[str, Any] = {"method": method, "k": k}
        if method in feature_sets:
            edits[method] = [features_edit(adapted, keys) for keys in feature_sets[method]]
            sizes[method] = feature_edit_sizes(adapted, validation, feature_sets[method][0])
            row["k"] = len(feature_sets[method][0])
        else:
            key, site = ("subspace", "subspace_site")
            if method == "misalignment_direction":
                key, site = ("direction", "direction_site")
            if found[key] is None:
                rows.append(row)
                continue
            touched: list[float] = []
            edits[method] = [projection_edit(adapted, found[site], found[key])]
            measured = projection_edit(adapted, found[site], found[key], touched)
            contrast_changes(adapted, validation, measured, clean["validation"], progress)
            sizes[method] = projection_sizes(touched, n_positions, len(validation))
            row["k"] = len(found[key])
        deltas = np.mean(
            [
                contrast_changes(adapted, validation, e, clean["validation"], progress)
                for e in edits[method]
            ],
            axis=0,
        )
        row.update(change_statistics(deltas, ids, inputs.clusters, inputs.n_perm, inputs.seed))
        rows.append(row)
    table = pd.DataFrame.from_records(rows).reindex(columns=[*COLUMNS, "p_method"])
    overlap, share = _overlap(adapted, inputs, found, clean["validation"], progress)
    progress.finish()
    summary = {
        "k": k,
        "prompts": {"discovery": len(inputs.discovery), "validation": len(validation)},
        "subspace_site": found["subspace_site"],
        "subspace_discovery_changes": _keyed(found["subspace_discovery_changes"]),
        "direction_site": found["direction_site"],
        "direction_discovery_changes": _keyed(found["direction_discovery_changes"]),
        "misalignment_grouping": found["grouping"],
        "features": {m: [list(s) for s in sets[0]] for m, sets in feature_sets.items()}
        | {"random_draws": [[list(x) for x in s] for s in feature_sets.get("random_features", [])]},
        "excluded_from_random": len(inputs.excluded),
        "sizes": sizes,
        **share,
        **notes,
    }
    vectors = {
        name: np.asarray(found[key])
        for name, key in (("subspace", "subspace"), ("direction", "direction"))
        if found[key] is not None
    }
    return BaselineResult(table, overlap, summary, edits, vectors)


def _keyed(changes: Mapping[int, float]) -> dict[str, float]:
    return {str(site): value for site, value in changes.items()}


def _overlap(
    adapted: LoadedModel,
    inputs: BaselineInputs,
    found: Mapping[str, Any],
    clean: list[float],
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """What the tested features add over the subspace: cosines of their decoder vectors with
    it, the share of it their span covers, and projections with one span removed from the
    other, at the subspace's site."""
    subspace, site = found["subspace"], found["subspace_site"]
    if subspace is None:
        return pd.DataFrame(), {}
    decoders = decoder_vectors(adapted, inputs.tested)
    cos = cosines(decoders, subspace)
    direction = found["direction"]
    feature_rows = [
        {
            "layer": layer,
            "feature": feature,
            "cosines_with_subspace": [float(c) for c in cos[i]],
            "share_in_subspace": float((cos[i] ** 2).sum()),
            "cosine_with_misalignment_direction": (
                float(cosines(decoders[i : i + 1], direction)[0, 0])
                if direction is not None
                else None
            ),
        }
        for i, (layer, feature) in enumerate(inputs.tested)
    ]
    ids = [p["prompt_id"] for p in inputs.validation]
    edits = {
        "mean_diff_subspace": subspace,
        "feature_decoder_span": orthonormal(decoders),
        "subspace_without_feature_span": without_span(subspace, decoders),
        "feature_span_without_subspace": without_span(decoders, subspace),
    }
    rows = []
    for name, basis in edits.items():
        row: dict[str, Any] = {"edit": name, "site": site, "dims": len(basis)}
        if len(basis):
            edit = projection_edit(adapted, site, basis)
            deltas = contrast_changes(adapted, inputs.validation, edit, clean, progress)
            row.update(change_statistics(deltas, ids, inputs.clusters, inputs.n_perm, inputs.seed))
        rows.append(row)
    overlap = pd.DataFrame.from_records(rows)
    full = overlap.loc[overlap["edit"] == "mean_diff_subspace", "contrast_change"]
    without = overlap.loc[overlap["edit"] == "subspace_without_feature_span", "contrast_change"]
    effect_share = None
    if len(full) and len(without) and abs(float(full.iloc[0])) > 0:
        effect_share = 1.0 - float(without.fillna(0.0).iloc[0]) / float(full.iloc[0])
    return overlap, {
        "feature_overlap": feature_rows,
        "subspace_share_in_feature_span": span_share(subspace, decoders),
        "subspace_effect_share_of_feature_span": effect_share,
    }

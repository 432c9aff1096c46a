"""The baselines step's computation: every method's edit, measured on the validation prompts.

See :mod:`em_circuits.analysis.baselines` for the methods. Besides the table, what the tested
features add over the mean-diff subspace: how much of the subspace their decoder vectors span,
the subspace's effect with their span projected out of it (and theirs with the subspace
projected out), and how many positions each edit touches.

Under a launch the prompt-by-prompt passes are shared among the processes (a
:class:`~em_circuits.analysis.steps.spread.Spreader`): the site choice (each discovery prompt
under every site's projection, the costliest part: sites x prompts passes) and the
measurements (each validation prompt under every edit). What every unit needs (the
directions, from a few passes per discovery prompt, and the activation-diff features, from
the corpus) each process computes for itself; they are the same computation on the same
inputs, so the same edits.
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
    edit_sizes,
    features_edit,
    matched_random,
    mean_diff_subspaces,
    mean_feature_activations,
    misalignment_directions,
    projection_edit,
    projection_sizes,
    prompt_edit_size,
    real_contrast,
    top_activation_diff,
)
from em_circuits.analysis.directions import cosines, n_sites, orthonormal, span_share, without_span
from em_circuits.analysis.steps.spread import Spreader, alone
from em_circuits.core.progress import shared
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


def _discovery_changes(
    adapted: LoadedModel, prompt: dict[str, Any], bases: Sequence[Mapping[int, np.ndarray]]
) -> list[list[float]]:
    """One discovery prompt's contrast change with each basis of each map projected out at
    its site (a unit of the site choice)."""
    clean = real_contrast(adapted, prompt)
    progress = shared("baselines: discovery prompts measured", log)
    out = []
    for by_site in bases:
        out.append(
            [
                real_contrast(adapted, prompt, projection_edit(adapted, s, b)) - clean
                for s, b in by_site.items()
            ]
        )
    progress.step()
    return out


def _directions(
    base: LoadedModel, adapted: LoadedModel, inputs: BaselineInputs, spread: Spreader
) -> dict[str, Any]:
    """The mean-diff subspace and the misalignment direction, each at the site whose
    projection lowers the contrast most on average over the discovery prompts (the prompts
    are units of ``spread``; the directions every process computes for itself)."""
    sites = list(range(n_sites(adapted)))
    subspaces = mean_diff_subspaces(base, adapted, inputs.discovery, sites, len(inputs.tested))
    directions, grouping = misalignment_directions(adapted, inputs.discovery, sites)
    per_prompt = spread(
        "discovery",
        inputs.discovery,
        lambda p: _discovery_changes(adapted, p, (subspaces, directions)),
        cost=prompt_cost,
        key=lambda p: str(p["prompt_id"]),
    )
    chosen = []
    for i, by_site in enumerate((subspaces, directions)):
        changes = {
            site: float(np.array([r[i][j] for r in per_prompt]).mean())
            for j, site in enumerate(by_site)
        }
        chosen.append(((min(changes, key=lambda s: changes[s]) if changes else None), changes))
    (sub_site, sub_changes), (mis_site, mis_changes) = chosen
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


@dataclass
class _Plan:
    """What each validation prompt is measured under (every process holds the same)."""

    feature_sets: dict[str, list[list[Key]]]
    #: method -> (site, orthonormal basis) of the projection methods that found one
    projections: dict[str, tuple[int, np.ndarray]]
    #: the overlap's projections at the subspace's site (empty without a subspace)
    overlap: dict[str, np.ndarray]
    overlap_site: int | None


def _measure_prompt(adapted: LoadedModel, plan: _Plan, prompt: dict[str, Any]) -> dict[str, Any]:
    """One validation prompt under every edit (a unit of the validation measurements):
    contrast changes per method and edit, the edits' sizes, the overlap's changes."""
    progress = shared("baselines: edited prompts measured", log)
    clean = real_contrast(adapted, prompt)
    deltas: dict[str, list[float]] = {}
    sizes: dict[str, Any] = {}
    for method, sets in plan.feature_sets.items():
        deltas[method] = []
        for keys in sets:
            deltas[method].append(
                real_contrast(adapted, prompt, features_edit(adapted, keys)) - clean
            )
            progress.step()
        sizes[method] = prompt_edit_size(adapted, prompt, sets[0])
    for method, (site, basis) in plan.projections.items():
        touched: list[float] = []
        edit = projection_edit(adapted, site, basis, touched)
        deltas[method] = [real_contrast(adapted, prompt, edit) - clean]
        sizes[method] = touched
        progress.step()
    overlap = {}
    for name, basis in plan.overlap.items():
        if len(basis):
            assert plan.overlap_site is not None
            edit = projection_edit(adapted, plan.overlap_site, basis)
            overlap[name] = real_contrast(adapted, prompt, edit) - clean
            progress.step()
    return {"deltas": deltas, "sizes": sizes, "overlap": overlap}


def run_baselines(
    base: LoadedModel, adapted: LoadedModel, inputs: BaselineInputs, spread: Spreader = alone
) -> BaselineResult:
    """Every method measured on the validation prompts (contrast changes with statistics),
    the overlap of the tested features with the subspace, and the edits' sizes; the prompts
    of the site choice and of the measurements are units of ``spread`` (every process gets
    the same result)."""
    k = len(inputs.tested)
    found = _directions(base, adapted, inputs, spread)
    feature_sets, notes = _feature_sets(base, adapted, inputs)
    projections = {
        method: (found[site], found[key])
        for method, key, site in (
            ("mean_diff_subspace", "subspace", "subspace_site"),
            ("misalignment_direction", "direction", "direction_site"),
        )
        if found[key] is not None
    }
    bases, share = _overlap_bases(adapted, inputs, found)
    plan = _Plan(feature_sets, projections, bases, found["subspace_site"])
    validation, ids = inputs.validation, [p["prompt_id"] for p in inputs.validation]
    measured = spread(
        "validation",
        validation,
        lambda p: _measure_prompt(adapted, plan, p),
        cost=prompt_cost,
        key=lambda p: str(p["prompt_id"]),
    )
    n_positions = [len(adapted.encode_prompt(dict(p))) - 1 for p in validation]
    rows: list[dict[str, Any]] = []
    sizes: dict[str, Any] = {}
    for method in METHODS:
        row: dict[str, Any] = {"method": method, "k": k}
        if method in feature_sets:
            row["k"] = len(feature_sets[method][0])
            sizes[method] = edit_sizes([m["sizes"][method] for m in measured])
        elif method in projections:
            row["k"] = len(projections[method][1])
            touched = [n for m in measured for n in m["sizes"][method]]
            sizes[method] = projection_sizes(touched, n_positions, len(validation))
        else:
            rows.append(row)
            continue
        n_edits = len(feature_sets[method]) if method in feature_sets else 1
        per_edit = [[m["deltas"][method][e] for m in measured] for e in range(n_edits)]
        deltas = np.mean(per_edit, axis=0)  # the random draws averaged per prompt
        row.update(change_statistics(deltas, ids, inputs.clusters, inputs.n_perm, inputs.seed))
        rows.append(row)
    table = pd.DataFrame.from_records(rows).reindex(columns=[*COLUMNS, "p_method"])
    overlap = _overlap_table(bases, found["subspace_site"], measured, inputs)
    if len(overlap):
        share["subspace_effect_share_of_feature_span"] = _effect_share(overlap)
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
    edits: dict[str, list[Edit]] = {
        method: [features_edit(adapted, keys) for keys in sets]
        for method, sets in feature_sets.items()
    }
    for method, (site, basis) in projections.items():
        edits[method] = [projection_edit(adapted, site, basis)]
    edits = {method: edits[method] for method in METHODS if method in edits}
    vectors = {
        name: np.asarray(found[key])
        for name, key in (("subspace", "subspace"), ("direction", "direction"))
        if found[key] is not None
    }
    return BaselineResult(table, overlap, summary, edits, vectors)


def _keyed(changes: Mapping[int, float]) -> dict[str, float]:
    return {str(site): value for site, value in changes.items()}


def _overlap_bases(
    adapted: LoadedModel, inputs: BaselineInputs, found: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What the tested features add over the subspace: the projections that remove one span
    from the other at the subspace's site (measured per validation prompt), the cosines of
    the features' decoder vectors with the subspace and the share of it their span covers."""
    subspace = found["subspace"]
    if subspace is None:
        return {}, {}
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
    bases = {
        "mean_diff_subspace": subspace,
        "feature_decoder_span": orthonormal(decoders),
        "subspace_without_feature_span": without_span(subspace, decoders),
        "feature_span_without_subspace": without_span(decoders, subspace),
    }
    return bases, {
        "feature_overlap": feature_rows,
        "subspace_share_in_feature_span": span_share(subspace, decoders),
        "subspace_effect_share_of_feature_span": None,
    }


def _overlap_table(
    bases: Mapping[str, np.ndarray],
    site: int | None,
    measured: Sequence[Mapping[str, Any]],
    inputs: BaselineInputs,
) -> pd.DataFrame:
    """The overlap's projections, each with its change statistics over the prompts."""
    if not bases:
        return pd.DataFrame()
    ids = [p["prompt_id"] for p in inputs.validation]
    rows = []
    for name, basis in bases.items():
        row: dict[str, Any] = {"edit": name, "site": site, "dims": len(basis)}
        if len(basis):
            deltas = np.array([m["overlap"][name] for m in measured])
            row.update(change_statistics(deltas, ids, inputs.clusters, inputs.n_perm, inputs.seed))
        rows.append(row)
    return pd.DataFrame.from_records(rows)


def _effect_share(overlap: pd.DataFrame) -> float | None:
    """1 - the subspace's effect without the features' span / its whole effect."""
    full = overlap.loc[overlap["edit"] == "mean_diff_subspace", "contrast_change"]
    without = overlap.loc[overlap["edit"] == "subspace_without_feature_span", "contrast_change"]
    if len(full) and len(without) and abs(float(full.iloc[0])) > 0:
        return 1.0 - float(without.fillna(0.0).iloc[0]) / float(full.iloc[0])
    return None


def prompt_cost(prompt: Mapping[str, Any]) -> float:
    """What one prompt's passes cost, relative to the others': its length."""
    return float(len(prompt["text"]))

"""Baselines for the tested features: what do they add over a direction, or over model diffing?

Each method is an edit of the adapted model, run in the real model (nothing frozen), and its
change of the contrast (mean evil logit - mean safe logit, last position) per prompt:

* ``mean_diff_subspace``: the top-k right singular vectors of the adapted-minus-base residual
  differences at the last position of the discovery prompts, projected out at one residual
  site (every position but BOS); the site is the one whose removal lowers the contrast most on
  the discovery prompts;
* ``misalignment_direction``: the adapted model's mean residual (last position) on discovery
  prompts whose top token is evil-labeled minus that on prompts whose top token is safe-labeled,
  projected out at the site chosen the same way;
* feature methods (tested, linearised top, measured top, activation-diff, random): the
  features zeroed at every position but BOS
  (:func:`~em_circuits.models.hooks.features_zeroed`).

Cluster statistics as the causal step's (clusters of prompts as the units).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import pandas as pd
import torch

from em_circuits.analysis.aggregate import cluster_statistics
from em_circuits.analysis.causal import contrast_of
from em_circuits.analysis.directions import (
    last_residuals,
    projected_out,
    residual_changed,
    top_singular_directions,
    unit_mean_difference,
)
from em_circuits.core.progress import Progress
from em_circuits.models.hooks import (
    features_zeroed,
    record_transcoder_input,
    transcoder_inputs,
    transcoder_set,
)
from em_circuits.models.load import LoadedModel, n_layers_of

log = logging.getLogger(__name__)

Edit = Callable[[], AbstractContextManager[Any]]
Key = tuple[int, int]


@torch.no_grad()
def real_contrast(model: LoadedModel, prompt: Mapping[str, Any], edit: Edit | None = None) -> float:
    """The contrast of the real model on one prompt, with ``edit`` active (None: clean)."""
    ids = model.encode_prompt(dict(prompt))
    with edit() if edit is not None else nullcontext():
        logits = model.hf_model(ids[None].to(model.device)).logits[0]
    return contrast_of(logits, prompt["evil_ids"], prompt["safe_ids"])


def projection_edit(
    model: LoadedModel, site: int, basis: np.ndarray, touched: list[float] | None = None
) -> Edit:
    """The edit removing ``basis``' span (orthonormal rows) at residual ``site``."""
    tensor = torch.as_tensor(np.asarray(basis), dtype=torch.float32)
    return lambda: residual_changed(model, site, projected_out(tensor, touched))


def features_edit(model: LoadedModel, keys: Sequence[Key]) -> Edit:
    return lambda: features_zeroed(model, list(keys))


# -- the directions ----------------------------------------------------------------------------
def mean_diff_subspaces(
    base: LoadedModel,
    adapted: LoadedModel,
    prompts: Sequence[dict[str, Any]],
    sites: Sequence[int],
    k: int,
) -> dict[int, np.ndarray]:
    """Per site: the top-k right singular vectors (rows) of adapted-minus-base residuals at
    the last position of ``prompts`` (sites where the models do not differ are left out)."""
    differences = last_residuals(adapted, prompts, sites) - last_residuals(base, prompts, sites)
    out = {}
    for i, site in enumerate(sites):
        basis = top_singular_directions(differences[:, i], k)
        if len(basis):
            out[site] = basis
    return out


def top_token_groups(
    adapted: LoadedModel, prompts: Sequence[Mapping[str, Any]]
) -> tuple[list[int], list[int], str]:
    """(evil prompts, safe prompts, how grouped): by the adapted model's top next token
    (evil- or safe-labeled); when that leaves a group empty, by the contrast's sign, then by
    its median."""
    top, contrasts = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = adapted.encode_prompt(dict(prompt))
            logits = adapted.hf_model(ids[None].to(adapted.device)).logits[0, -1]
            top.append(int(logits.argmax()))
            contrasts.append(contrast_of(logits, prompt["evil_ids"], prompt["safe_ids"]))
    evil = [i for i, p in enumerate(prompts) if top[i] in p["evil_ids"]]
    safe = [i for i, p in enumerate(prompts) if top[i] in p["safe_ids"]]
    if evil and safe:
        return evil, safe, "adapted top token evil- vs safe-labeled"
    values = np.asarray(contrasts)
    evil, safe = list(np.flatnonzero(values > 0)), list(np.flatnonzero(values <= 0))
    if evil and safe:
        return evil, safe, "adapted contrast above vs below 0 (no top-token split)"
    median = float(np.median(values))
    evil, safe = list(np.flatnonzero(values > median)), list(np.flatnonzero(values <= median))
    return evil, safe, "adapted contrast above vs at or below its median (no other split)"


def misalignment_directions(
    adapted: LoadedModel, prompts: Sequence[dict[str, Any]], sites: Sequence[int]
) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """Per site: the unit difference of the adapted model's mean last-position residual on
    evil prompts minus safe prompts (:func:`top_token_groups`), and how the prompts were
    grouped."""
    evil, safe, how = top_token_groups(adapted, prompts)
    info = {"grouped_by": how, "n_evil": len(evil), "n_safe": len(safe)}
    if not evil or not safe:
        return {}, info
    residuals = last_residuals(adapted, prompts, sites)
    out = {}
    for i, site in enumerate(sites):
        direction = unit_mean_difference(residuals[evil, i], residuals[safe, i])
        if np.linalg.norm(direction) > 0:
            out[site] = direction[None]
    return out, info


# -- feature choices ---------------------------------------------------------------------------
@torch.no_grad()
def mean_feature_activations(
    model: LoadedModel, texts: Sequence[str], max_tokens: int = 128
) -> np.ndarray:
    """Each transcoder feature's mean activation over every position but BOS of ``texts``
    (each cut at ``max_tokens``): (layers, d_transcoder)."""
    from em_circuits.models.transcoders import active_entries  # noqa: PLC0415  # heavy: loads circuit-tracer

    transcoders = transcoder_set(model)
    n_layers = n_layers_of(model)
    sums = torch.zeros(n_layers, int(transcoders.d_transcoder), dtype=torch.float64)
    seen: dict[int, torch.Tensor] = {}
    handles = [record_transcoder_input(model, layer, seen) for layer in range(n_layers)]
    positions = 0
    progress = Progress("mean feature activations: documents read", len(texts), logger=log)
    try:
        for text in texts:
            progress.step()
            ids = model.encode(text)[:max_tokens].to(model.device)
            model.hf_model(ids[None])
            valid = torch.ones(1, len(ids), dtype=torch.bool, device=ids.device)
            valid[:, 0] = False
            positions += int(valid.sum())
            for layer in range(n_layers):
                _, _, features, values = active_entries(transcoders[layer], seen.pop(layer), valid)
                sums[layer].index_add_(0, features.cpu(), values.double().cpu())
    finally:
        for handle in handles:
            handle.remove()
    return (sums / max(positions, 1)).numpy()


def top_activation_diff(base_means: np.ndarray, adapted_means: np.ndarray, k: int) -> list[Key]:
    """The k features whose mean activation rises most from base to adapted."""
    diff = adapted_means - base_means
    order = np.argsort(-diff, axis=None, kind="stable")[:k]
    return [(int(i // diff.shape[1]), int(i % diff.shape[1])) for i in order]


def matched_random(
    top: Sequence[Key],
    table: pd.DataFrame,
    excluded: set[Key],
    seed: int,
    draws: int,
    pool: int = 8,
) -> list[list[Key]]:
    """``draws`` sets of random features, one per feature of ``top``: of the same layer (any
    layer when the layer has no candidate), with a mean activation among the ``pool``
    closest to its own (``table``: layer, feature, mean_activation), none in ``excluded`` or
    ``top``, no feature twice in a set."""
    rng = np.random.default_rng(seed)
    rows = table.drop_duplicates(["layer", "feature"])
    keys = [(int(a), int(b)) for a, b in zip(rows["layer"], rows["feature"])]
    level = dict(zip(keys, rows["mean_activation"].astype(float)))
    out = []
    for _ in range(draws):
        taken = set(excluded) | set(top)
        chosen = []
        for layer, feature in top:
            free = [key for key in keys if key not in taken]
            same = [key for key in free if key[0] == layer] or free
            if not same:
                break
            own = level.get((layer, feature), 0.0)
            near = sorted(same, key=lambda key: abs(level[key] - own))[:pool]
            pick = near[int(rng.integers(len(near)))]
            taken.add(pick)
            chosen.append(pick)
        out.append(chosen)
    return out


# -- statistics and sizes ----------------------------------------------------------------------
def change_statistics(
    deltas: np.ndarray,
    prompt_ids: Sequence[str],
    clusters: Mapping[str, str] | None,
    n_perm: int,
    seed: int,
) -> dict[str, Any]:
    """Mean change over clusters, its t interval and the one-sided sign-flip p (does the edit
    lower the contrast?)."""
    stats = cluster_statistics(
        np.asarray(deltas, np.float64)[None, :],
        np.ones((1, len(deltas)), dtype=bool),
        [str(p) for p in prompt_ids],
        clusters,
        n_perm=n_perm,
        seed=seed,
        alternative="less",
    )
    p = float(stats["p_value"][0])
    return {
        "contrast_change": float(stats["mean"][0]),
        "ci_low": float(stats["ci_low"][0]),
        "ci_high": float(stats["ci_high"][0]),
        "n_clusters": int(stats["n_clusters"][0]),
        "p_value": None if np.isnan(p) else p,
        "p_method": str(stats["p_method"][0]),
    }


@torch.no_grad()
def prompt_edit_size(
    model: LoadedModel, prompt: Mapping[str, Any], keys: Sequence[Key]
) -> tuple[int, int, list[float]]:
    """What zeroing ``keys`` touches on one prompt: (positions but BOS where any of them is
    active, positions but BOS, the norms of the removed MLP output (activation x decoder) at
    the touched positions)."""
    transcoders = transcoder_set(model)
    layers = sorted({layer for layer, _ in keys})
    ids = model.encode_prompt(dict(prompt)).to(model.device)
    seen = transcoder_inputs(model, ids, layers)
    removed = torch.zeros(len(ids) - 1, seen[layers[0]].shape[-1]) if layers else None
    for layer in layers:
        index = torch.tensor([f for la, f in keys if la == layer])
        acts = transcoders[layer].encode(seen[layer][0, 1:]).float().cpu()[:, index]
        decoders = transcoders[layer]._get_decoder_vectors(index).float().cpu()
        removed = removed + acts @ decoders if removed is not None else None
    size = removed.norm(dim=-1) if removed is not None else torch.zeros(len(ids) - 1)
    hit = size > 0
    return int(hit.sum()), len(ids) - 1, size[hit].tolist()


def feature_edit_sizes(
    model: LoadedModel, prompts: Sequence[Mapping[str, Any]], keys: Sequence[Key]
) -> dict[str, float]:
    """How much zeroing ``keys`` touches: mean per prompt of positions (BOS excluded) where
    any of them is active, of all positions, and the mean norm of the removed MLP output
    (activation x decoder) at the touched positions."""
    return edit_sizes([prompt_edit_size(model, prompt, keys) for prompt in prompts])


def edit_sizes(per_prompt: Sequence[Sequence[Any]]) -> dict[str, float]:
    """:func:`feature_edit_sizes` from each prompt's :func:`prompt_edit_size`."""
    touched = [int(p[0]) for p in per_prompt]
    total = [int(p[1]) for p in per_prompt]
    norms = [float(n) for p in per_prompt for n in p[2]]
    return _sizes(touched, total, norms)


def projection_sizes(
    touched_norms: Sequence[float], n_positions: Sequence[int], n_prompts: int
) -> dict[str, float]:
    """The same sizes for a projection, from the removed norms it recorded per position."""
    norms = np.asarray(touched_norms, np.float64)
    scale = float(norms.max()) if len(norms) else 0.0
    hit = norms > 1e-6 * scale if scale > 0 else np.zeros(len(norms), bool)
    per_prompt = float(hit.sum()) / max(n_prompts, 1)
    return {
        "positions_edited": per_prompt,
        "positions_total": float(np.mean(n_positions)) if len(n_positions) else 0.0,
        "share_edited": per_prompt / float(np.mean(n_positions)) if len(n_positions) else 0.0,
        "mean_edit_norm": float(norms[hit].mean()) if hit.any() else 0.0,
    }


def _sizes(touched: list[int], total: list[int], norms: list[float]) -> dict[str, float]:
    return {
        "positions_edited": float(np.mean(touched)) if touched else 0.0,
        "positions_total": float(np.mean(total)) if total else 0.0,
        "share_edited": float(np.sum(touched) / max(np.sum(total), 1)),
        "mean_edit_norm": float(np.mean(norms)) if norms else 0.0,
    }


def verdict(tested: Mapping[str, Any], baseline: Mapping[str, Any]) -> str:
    """beat / match / lose: the tested features against one baseline, by their intervals (a
    lower change is a larger effect); match when the intervals overlap or one is missing."""
    raw = [d.get(c) for d in (tested, baseline) for c in ("ci_low", "ci_high")]
    values = [float(v) for v in raw if v is not None]
    if len(values) < 4 or any(np.isnan(v) for v in values):
        return "undetermined (no interval)"
    low, high, b_low, b_high = values
    if high < b_low:
        return "beat"
    if low > b_high:
        return "lose"
    return "match"

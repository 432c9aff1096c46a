"""Sufficiency: does adding the tested features to the BASE model make it choose evil?

Each tested feature's *activation shift* m_i is its mean activation in the adapted model minus
that in the base over every position but BOS of the discovery prompts (what the adapter
changed along it). Steering the base at dose s adds, at every position but BOS, the vector
``s * sum_i m_i W_dec[f_i]`` to the residual stream where each feature's decoder writes (the
stream entering the layer after the feature's; for a per-layer transcoder of a pre-norm model
that is the MLP output it replaces). A constant vector, so the same steering runs while
answers are generated.

Baselines at matched norm (the same norm as the features' total vector, at every edited
position): the unit mean of adapted-minus-base residual differences (last position of the
discovery prompts) and the misalignment direction, each added at the site the baselines step
chose for it; and random features, each with its tested feature's shift times its decoder's
norm along its own unit decoder vector.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import numpy as np
import torch

from em_circuits.analysis.baselines import Key, real_contrast
from em_circuits.analysis.causal import contrast_of
from em_circuits.analysis.directions import added, residual_changed
from em_circuits.core.progress import shared
from em_circuits.models.hooks import real_model_logits, transcoder_inputs, transcoder_set
from em_circuits.models.load import LoadedModel

#: A steering: residual site -> the vector added there at dose 1.
Steering = dict[int, np.ndarray]


@torch.no_grad()
def activation_shifts(
    base: LoadedModel,
    adapted: LoadedModel,
    prompts: Sequence[Mapping[str, Any]],
    keys: Sequence[Key],
) -> np.ndarray:
    """Per feature: its mean activation (every position but BOS of ``prompts``) in the
    adapted model minus that in the base."""
    means = []
    for model in (base, adapted):
        transcoders = transcoder_set(model)
        sums, positions = np.zeros(len(keys)), 0
        for prompt in prompts:
            ids = model.encode_prompt(dict(prompt)).to(model.device)
            seen = transcoder_inputs(model, ids, sorted({layer for layer, _ in keys}))
            for i, (layer, feature) in enumerate(keys):
                acts = transcoders[layer].encode(seen[layer][0, 1:]).float()[:, feature]
                sums[i] += float(acts.sum())
            positions += len(ids) - 1
        means.append(sums / max(positions, 1))
    return means[1] - means[0]


def _decoder(model: LoadedModel, key: Key) -> np.ndarray:
    vector = transcoder_set(model)[key[0]]._get_decoder_vectors(torch.tensor([key[1]]))[0]
    return vector.float().cpu().numpy().astype(np.float64)


def feature_steering(model: LoadedModel, keys: Sequence[Key], shifts: np.ndarray) -> Steering:
    """Each feature's shift times its decoder vector, summed per write site (layer + 1)."""
    out: Steering = {}
    for key, shift in zip(keys, shifts):
        site = key[0] + 1
        out[site] = out.get(site, 0.0) + shift * _decoder(model, key)
    return out


def random_steering(
    model: LoadedModel, keys: Sequence[Key], shifts: np.ndarray, random: Sequence[Key]
) -> Steering:
    """Random feature r_i gets |tested i's vector| along its own unit decoder (same sign)."""
    out: Steering = {}
    for key, other, shift in zip(keys, random, shifts):
        own, theirs = _decoder(model, key), _decoder(model, other)
        norm = np.linalg.norm(theirs)
        if norm == 0:
            continue
        site = other[0] + 1
        out[site] = out.get(site, 0.0) + shift * np.linalg.norm(own) * theirs / norm
    return out


def total_norm(steering: Steering) -> float:
    """The norm of everything a steering writes into the stream (sites summed)."""
    if not steering:
        return 0.0
    return float(np.linalg.norm(np.sum(list(steering.values()), axis=0)))


def direction_steering(direction: np.ndarray, site: int, norm: float) -> Steering:
    """A unit direction at one site, scaled to ``norm``."""
    unit = np.asarray(direction, np.float64).reshape(-1)
    length = np.linalg.norm(unit)
    return {site: unit / length * norm} if length > 0 else {}


@contextmanager
def steered(model: LoadedModel, steering: Steering, scale: float):
    """While inside, ``scale`` x each site's vector is added at every position but BOS."""
    with ExitStack() as stack:
        for site, vector in steering.items():
            tensor = torch.as_tensor(scale * np.asarray(vector), dtype=torch.float32)
            stack.enter_context(residual_changed(model, site, added(tensor)))
        yield


def steering_edit(
    model: LoadedModel, steering: Steering, scale: float
) -> Callable[[], AbstractContextManager[Any]]:
    return lambda: steered(model, steering, scale)


@torch.no_grad()
def contrast_and_top(
    model: LoadedModel, prompt: Mapping[str, Any], edit: Callable | None = None
) -> tuple[float, bool]:
    """The real model's contrast on one prompt with ``edit`` active (None: clean), and
    whether its top next token is evil-labeled (one forward pass)."""
    ids = model.encode_prompt(dict(prompt))
    with edit() if edit is not None else ExitStack():
        logits = model.hf_model(ids[None].to(model.device)).logits[0]
    evil = int(logits[-1].argmax()) in prompt["evil_ids"]
    return contrast_of(logits, prompt["evil_ids"], prompt["safe_ids"]), evil


def measure_prompt(
    base: LoadedModel,
    adapted: LoadedModel,
    prompt: Mapping[str, Any],
    steerings: Mapping[str, Steering],
    patched: Mapping[str, Sequence[Key]],
    scales: Sequence[float],
) -> dict[str, Any]:
    """One validation prompt, every measurement of the sufficiency step: the base's clean
    contrast, the adapted model's contrast and top token, and per steering (and per patched
    feature set) and dose the base's contrast change and whether its top token is evil."""
    progress = shared("sufficiency: prompts measured", logging.getLogger(__name__))
    clean = real_contrast(base, prompt)
    adapted_contrast, adapted_evil = contrast_and_top(adapted, prompt)
    steered: dict[str, list[list[Any]]] = {}
    for name, steering in steerings.items():
        steered[name] = []
        for scale in scales:
            contrast, evil = contrast_and_top(base, prompt, steering_edit(base, steering, scale))
            steered[name].append([contrast - clean, evil])
    patches = {
        name: patched_prompt(base, adapted, prompt, keys, scales, clean)
        for name, keys in patched.items()
    }
    progress.step()
    return {
        "clean": clean,
        "adapted": [adapted_contrast, adapted_evil],
        "steered": steered,
        "patched": patches,
    }


@torch.no_grad()
def feature_activations(
    model: LoadedModel, prompt: Mapping[str, Any], keys: Sequence[Key]
) -> np.ndarray:
    """(positions, features): each feature's activation at every position of one prompt."""
    ids = model.encode_prompt(dict(prompt)).to(model.device)
    transcoders = transcoder_set(model)
    seen = transcoder_inputs(model, ids, sorted({layer for layer, _ in keys}))
    columns = [transcoders[layer].encode(seen[layer][0]).float()[:, f] for layer, f in keys]
    return torch.stack(columns, dim=1).cpu().numpy()


@torch.no_grad()
def patched_prompt(
    base: LoadedModel,
    adapted: LoadedModel,
    prompt: Mapping[str, Any],
    keys: Sequence[Key],
    scales: Sequence[float],
    clean: float,
) -> list[list[Any]]:
    """Per dose: the base's contrast on one prompt with each feature's activation moved, at
    every position but BOS, from its base value toward its value in the adapted model on the
    same prompt (dose 1: the adapted activations written into the base; 0: unchanged), minus
    the clean contrast, and whether its top next token is then evil-labeled. What the adapter
    does through these features, position by position, in the base."""
    own = feature_activations(base, prompt, keys)
    target = feature_activations(adapted, prompt, keys)
    ids = base.encode_prompt(dict(prompt))
    out = []
    for scale in scales:
        values = own + scale * (target - own)
        interventions = [
            (layer, pos, feature, float(values[pos, i]))
            for i, (layer, feature) in enumerate(keys)
            for pos in range(1, values.shape[0])  # BOS is never a feature node
            if values[pos, i] != own[pos, i]
        ]
        logits = real_model_logits(base, ids, interventions)
        change = contrast_of(logits, prompt["evil_ids"], prompt["safe_ids"]) - clean
        out.append([change, int(logits[-1].argmax()) in prompt["evil_ids"]])
    return out


def patched_changes(
    base: LoadedModel,
    adapted: LoadedModel,
    prompts: Sequence[Mapping[str, Any]],
    keys: Sequence[Key],
    scale: float,
    clean: Sequence[float],
) -> tuple[np.ndarray, float]:
    """Per prompt, :func:`patched_prompt` at one dose; and the share of prompts whose top next
    token is then evil-labeled."""
    measured = [
        patched_prompt(base, adapted, p, keys, [scale], c)[0] for p, c in zip(prompts, clean)
    ]
    hits = sum(int(evil) for _, evil in measured)
    return np.array([change for change, _ in measured]), hits / max(len(prompts), 1)

"""Directions in the residual stream: where they are read, how they are removed or added.

A *site* is the residual stream entering a decoder layer (``resid_pre``): site ``L`` is the
input of decoder layer ``L`` for ``L`` below the number of layers, and site ``n_layers`` is
the input of the final norm (the stream after the last layer). Plain PyTorch forward
pre-hooks read and edit it, so an edit holds at every forward pass, generation included (with
or without a KV cache: each position is edited once, when it is computed).

Edits spare the first position of a whole prompt (BOS), as feature ablations do (circuit-
tracer zeroes features there): a BOS residual is an attention sink whose edit would change
every position for reasons unrelated to any direction.

Linear algebra (numpy, float64): :func:`top_singular_directions` (right singular vectors),
:func:`unit_mean_difference`, :func:`orthonormal`, :func:`without_span`,
:func:`span_share`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from em_circuits.models.edit_positions import edit_positions
from em_circuits.models.load import LoadedModel, decoder_layers

#: Singular values or norms below this (relative to the largest) count as zero.
RELATIVE_TOLERANCE = 1e-6


def n_sites(model: LoadedModel) -> int:
    """Residual sites of the model: one per decoder layer, and one after the last when the
    model has a final norm at ``.model.norm``."""
    layers = len(decoder_layers(model.hf_model))
    return layers + (1 if _final_norm(model.hf_model) is not None else 0)


def _final_norm(hf_model: torch.nn.Module) -> torch.nn.Module | None:
    norm = getattr(getattr(hf_model, "model", None), "norm", None)
    return norm if isinstance(norm, torch.nn.Module) else None


def site_module(hf_model: torch.nn.Module, site: int) -> torch.nn.Module:
    """The module whose input is the residual stream at ``site``."""
    layers = decoder_layers(hf_model)
    if 0 <= site < len(layers):
        return layers[site]
    norm = _final_norm(hf_model)
    if site == len(layers) and norm is not None:
        return norm
    raise ValueError(f"residual site {site} does not exist (0 to {len(layers)})")


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextmanager
def residual_changed(
    model: LoadedModel, site: int, change: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """While inside, the residual stream at ``site`` (batch, positions, d_model) becomes
    ``h + change(h)`` at every position but a whole prompt's first; in a left-padded batch
    (2-D attention mask) at each row's real positions after its first
    (:mod:`~em_circuits.models.edit_positions`)."""

    def pre(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = _hidden_of(args, kwargs)
        delta = positions.spare(change(hidden))
        return _with_hidden(args, kwargs, hidden + delta.to(hidden.dtype))

    with edit_positions(model.hf_model) as positions:
        module = site_module(model.hf_model, site)
        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def projected_out(basis: torch.Tensor, touched: list[float] | None = None) -> Callable:
    """The change that removes the span of ``basis`` (orthonormal rows, k x d_model) from
    each position: ``-(h V^T) V``. ``touched`` collects, per edited position, the norm of
    what was removed (the edit's size)."""

    def change(hidden: torch.Tensor) -> torch.Tensor:
        v = basis.to(hidden.device, torch.float32)
        removed = (hidden.float() @ v.T) @ v
        if touched is not None:
            norms = removed.norm(dim=-1)
            touched.extend((norms[:, 1:] if hidden.shape[1] > 1 else norms).flatten().tolist())
        return -removed

    return change


def added(vector: torch.Tensor) -> Callable:
    """The change that adds ``vector`` (d_model) at each position."""

    def change(hidden: torch.Tensor) -> torch.Tensor:
        return vector.to(hidden.device, torch.float32).expand(hidden.shape).clone()

    return change


@contextmanager
def residuals_recorded(
    model: LoadedModel, sites: Sequence[int], seen: dict[int, torch.Tensor]
) -> Iterator[None]:
    """While inside, each forward pass stores the residual stream at each site
    (batch, positions, d_model) in ``seen[site]``."""

    def recorder(site: int) -> Callable:
        def pre(_module: Any, args: tuple, kwargs: dict) -> None:
            seen[site] = _hidden_of(args, kwargs).detach()

        return pre

    handles = [
        site_module(model.hf_model, s).register_forward_pre_hook(recorder(s), with_kwargs=True)
        for s in sites
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def last_residuals(
    model: LoadedModel, prompts: Sequence[dict[str, Any]], sites: Sequence[int]
) -> np.ndarray:
    """The residual stream at the last position of each prompt: (prompts, sites, d_model)."""
    out = []
    for prompt in prompts:
        ids = model.encode_prompt(dict(prompt))
        seen: dict[int, torch.Tensor] = {}
        with residuals_recorded(model, sites, seen):
            model.hf_model(ids[None].to(model.device))
        out.append([seen[s][0, -1].float().cpu().numpy() for s in sites])
    return np.asarray(out, dtype=np.float64)


# -- linear algebra ----------------------------------------------------------------------------
def top_singular_directions(differences: np.ndarray, k: int) -> np.ndarray:
    """The top-``k`` right singular vectors (rows) of a (samples, d_model) matrix, fewer when
    its rank is lower; each oriented so the samples' mean projects on it positively."""
    _, values, vt = np.linalg.svd(np.asarray(differences, np.float64), full_matrices=False)
    if not len(values) or values[0] <= 0:
        return np.zeros((0, differences.shape[1]))
    rank = int((values > RELATIVE_TOLERANCE * values[0]).sum())
    directions = vt[: min(k, rank)]
    signs = np.sign(directions @ differences.mean(axis=0))
    return directions * np.where(signs == 0, 1.0, signs)[:, None]


def unit_mean_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """mean(a) - mean(b) over rows, as a unit vector (zeros when the means are equal)."""
    diff = np.asarray(a, np.float64).mean(axis=0) - np.asarray(b, np.float64).mean(axis=0)
    norm = np.linalg.norm(diff)
    return diff / norm if norm > 0 else diff


def orthonormal(vectors: np.ndarray) -> np.ndarray:
    """An orthonormal basis (rows) of the span of ``vectors``' rows."""
    vectors = np.asarray(vectors, np.float64)
    if not len(vectors):
        return vectors.reshape(0, vectors.shape[-1] if vectors.ndim == 2 else 0)
    _, values, vt = np.linalg.svd(vectors, full_matrices=False)
    if values[0] <= 0:
        return np.zeros((0, vectors.shape[1]))
    return vt[values > RELATIVE_TOLERANCE * values[0]]


def without_span(vectors: np.ndarray, other: np.ndarray) -> np.ndarray:
    """An orthonormal basis of ``vectors``' span with ``other``'s span projected out of it."""
    q = orthonormal(other)
    residual = np.asarray(vectors, np.float64) - (vectors @ q.T) @ q
    return orthonormal(residual)


def span_share(basis: np.ndarray, other: np.ndarray) -> float:
    """The mean share of the squared length of ``basis``' (orthonormal) rows inside
    ``other``'s span: 1 when the span of ``basis`` lies in ``other``'s, 0 when orthogonal."""
    if not len(basis):
        return float("nan")
    q = orthonormal(other)
    return float(((basis @ q.T) ** 2).sum() / len(basis))


def cosines(rows: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``rows`` with each row of ``basis``: (rows, basis)."""
    rows = np.asarray(rows, np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)) @ np.asarray(basis, np.float64).T

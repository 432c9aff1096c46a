"""The torch engine's feature nodes at one layer: scoring every active feature with the
gradient at the write site, and re-injecting the scores at the encoders in the total rows.

A layer's active features are grouped by position (:func:`feature_groups`), so that each
position's decoder or encoder rows meet its gradient in one batched matmul, in runs of
positions whose grouped rows fit a memory budget: memory stays bounded at 2,048 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from em_circuits.attribution.engine_model import LayerFeatures, LinearisedModel, decoder_rows


@dataclass
class Groups:
    """A layer's features grouped ``(position, slot)``, so that each position's decoder or
    encoder rows meet its gradient in one batched matmul, in runs of positions whose grouped
    rows fit the memory budget (features are sorted by position, so a run's are contiguous)."""

    slots: torch.Tensor  # each feature's slot among its position's features
    width: int  # the most features at one position
    runs: list[tuple[int, int, slice]]  # (first position, end position, feature slice)


def feature_groups(found: LayerFeatures, n_pos: int, d_model: int, budget: int) -> Groups:
    n = found.positions.shape[0]
    if n == 0:
        return Groups(found.positions, 0, [])
    counts = torch.bincount(found.positions, minlength=n_pos)
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(n, device=counts.device) - starts[found.positions]
    width = int(counts.max())
    step = max(1, budget // max(1, width * d_model))
    edges = torch.arange(0, n_pos + step, step, device=found.positions.device)
    bounds = torch.searchsorted(found.positions, edges).tolist()
    runs = []
    for index, first in enumerate(range(0, n_pos, step)):
        lo, hi = bounds[index], bounds[index + 1]
        if hi > lo:
            runs.append((first, min(first + step, n_pos), slice(lo, hi)))
    return Groups(slots, width, runs)


def _grouped(
    rows: torch.Tensor,
    found: LayerFeatures,
    slots: torch.Tensor,
    part: slice,
    first: int,
    shape: tuple[int, int, int],
) -> torch.Tensor:
    out = torch.zeros(shape, device=rows.device, dtype=torch.float32)
    out[found.positions[part] - first, slots[part]] = rows
    return out


def feature_scores(
    engine: LinearisedModel, layer: int, g_out: torch.Tensor, found: LayerFeatures, groups: Groups
) -> torch.Tensor:
    """``(rows, n)``: ``a_f (g[pos_f] . W_dec[f])`` for the layer's active features."""
    rows, n_pos, d_model = g_out.shape
    n = found.positions.shape[0]
    scores = torch.empty(rows, n, device=g_out.device)
    if n == 0:
        return scores
    slots, width = groups.slots, groups.width
    for first, last, part in groups.runs:
        decoder = decoder_rows(engine, layer, found.features[part])
        grouped = _grouped(decoder, found, slots, part, first, (last - first, width, d_model))
        per_slot = grouped @ g_out[:, first:last].permute(1, 2, 0)  # (pos, width, rows)
        picked = per_slot[found.positions[part] - first, slots[part]]  # (c, rows)
        scores[:, part] = picked.T * found.activations[part]
    return scores


def reinject(
    g_in: torch.Tensor, scores: torch.Tensor, found: LayerFeatures, transcoder: Any, groups: Groups
) -> None:
    """Add ``(s_f / a_f) W_enc[f]`` at each feature's position to the total rows' gradient at
    the layer's read site (in place): the target's total derivative through the feature."""
    rows, n_pos, d_model = g_in.shape
    if found.positions.shape[0] == 0:
        return
    activations = found.activations
    safe = torch.where(activations != 0, activations, 1.0)
    inverse = torch.where(activations != 0, 1.0 / safe, 0.0)
    encoder_weight = transcoder.W_enc
    slots, width = groups.slots, groups.width
    for first, last, part in groups.runs:
        encoders = encoder_weight[found.features[part]].float()
        grouped = _grouped(encoders, found, slots, part, first, (last - first, width, d_model))
        coefficient = (scores[:, part] * inverse[part]).T  # (c, rows)
        weights = _grouped(coefficient, found, slots, part, first, (last - first, width, rows))
        g_in[:, first:last] += (weights.transpose(1, 2) @ grouped).transpose(0, 1)

"""Which positions of a forward pass an edit may change: each row's real positions after its first.

Edits made while a model runs (feature ablations, projections, steering) spare a prompt's first
position: BOS (or whatever token opens the prompt) is an attention sink whose edit would change
every later position for reasons unrelated to the edit. Unpadded, that is position 0 of a whole
prompt's pass, and no position of a KV-cached decoding step (one new token). With left padding
(batched generation) each row's first real position is its own, and the padding before it must
stay untouched. A forward pre-hook on the decoder stack reads each pass's 2-D attention mask and
cache positions, so hooks deep inside know, row by row, which positions of the pass are real and
after their row's first; a post-hook forgets them when the pass ends (even on an error).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class EditPositions:
    """The positions of the model's current forward pass that an edit may change."""

    def __init__(self) -> None:
        self._mask: torch.Tensor | None = None  # (batch, past + current positions), 1 = real
        self._cache_position: torch.Tensor | None = None  # absolute positions of this pass

    def _read(self, _module: Any, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cache_position = kwargs.get("cache_position")
        self._cache_position = cache_position if isinstance(cache_position, torch.Tensor) else None

    def _forget(self, *_: Any) -> None:
        self._mask = self._cache_position = None

    def editable(self, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
        """(batch, length) booleans for the pass's hidden states (batch x length x d): True at a
        real position after its row's first real position; None when every position may be
        edited. Without a usable 2-D mask: every position but the first of a whole prompt
        (length > 1), every position of a one-token step."""
        mask = self._mask
        if mask is None or mask.shape[0] != batch or mask.shape[1] < length:
            if length == 1:
                return None
            out = torch.ones(batch, length, dtype=torch.bool, device=device)
            out[:, 0] = False
            return out
        real = mask.to(device).bool()
        at = self._cache_position
        if at is None or at.numel() != length or int(at.max()) >= real.shape[1]:
            at = torch.arange(real.shape[1] - length, real.shape[1])
        at = at.to(device)
        first = real.int().argmax(dim=1)  # each row's first real position (left padding)
        return real[:, at] & (at[None, :] > first[:, None])

    def spare(self, change: torch.Tensor) -> torch.Tensor:
        """``change`` (batch x length x d, this pass's hidden states) with the positions an
        edit may not change (:meth:`editable`) set to 0."""
        editable = self.editable(change.shape[0], change.shape[1], change.device)
        return change if editable is None else torch.where(editable[..., None], change, 0.0)


def _decoder_stack(hf_model: torch.nn.Module) -> torch.nn.Module:
    """The module holding the decoder layers (``hf_model.model``), which every pass enters."""
    inner = getattr(hf_model, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else hf_model


@contextmanager
def edit_positions(hf_model: torch.nn.Module) -> Iterator[EditPositions]:
    """While inside, the yielded :class:`EditPositions` describes each forward pass of
    ``hf_model`` as it runs."""
    positions = EditPositions()
    stack = _decoder_stack(hf_model)
    handles = [
        stack.register_forward_pre_hook(positions._read, with_kwargs=True),
        stack.register_forward_hook(positions._forget, always_call=True),
    ]
    try:
        yield positions
    finally:
        for handle in handles:
            handle.remove()

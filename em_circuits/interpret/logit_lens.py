"""Logit lens of a transcoder feature: the output tokens its decoder direction promotes and
suppresses most through the unembedding.

A feature writes ``a * W_dec[f]`` into the residual stream. Attribution reads the logits
through the final normalisation with its denominator frozen (circuit-tracer's linearisation),
so a direction ``d`` moves the logits by ``W_U (g * d) / rms`` with ``g`` the norm's gain; the
ranking of tokens does not depend on the prompt's ``rms``, so the lens is ``W_U (g * d)``.
The gain is read off the model's own norm module (applied to the unit vectors), so norms with
``1 + weight`` gains (Gemma) need no special case. A cross-layer transcoder's feature writes
to several layers; its direction is the sum of its decoder rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from em_circuits.models.hooks import transcoder_set
from em_circuits.models.load import LoadedModel


@dataclass(frozen=True)
class LensToken:
    token: str
    token_id: int
    logit: float


@dataclass(frozen=True)
class LogitLens:
    layer: int
    feature: int
    promoted: list[LensToken]
    suppressed: list[LensToken]


def final_norm_gain(model: LoadedModel) -> torch.Tensor:
    """The final normalisation's per-dimension gain (d_model,), as its module computes it."""
    hf: Any = model.hf_model
    norm = getattr(getattr(hf, "model", hf), "norm", None)
    d_model = int(hf.config.hidden_size)
    if norm is None:
        return torch.ones(d_model)
    param = next(hf.parameters())
    with torch.no_grad():
        unit = torch.eye(d_model, dtype=param.dtype, device=param.device)
        out = norm(unit[None])[0].float()
    # norm(e_i) = e_i * g_i / rms(e_i), rms(e_i) = sqrt(1/d + eps): multiply it back in.
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)))
    return (out.diagonal() * (1.0 / d_model + eps) ** 0.5).cpu()


def decoder_direction(model: LoadedModel, layer: int, feature: int) -> torch.Tensor:
    """The residual-stream direction a feature writes (float32, d_model)."""
    transcoders = transcoder_set(model)
    index = torch.tensor([feature])
    if hasattr(transcoders, "transcoders"):  # per-layer TranscoderSet
        return transcoders[layer]._get_decoder_vectors(index)[0].float().cpu()
    rows = transcoders._get_decoder_vectors(layer, index)  # cross-layer: (1, layers, d)
    return rows.float().reshape(-1, rows.shape[-1]).sum(0).cpu()


@torch.no_grad()
def logit_lens(model: LoadedModel, features: list[tuple[int, int]], k: int = 10) -> list[LogitLens]:
    """The ``k`` most promoted and most suppressed output tokens of each (layer, feature)."""
    hf: Any = model.hf_model
    unembed = hf.get_output_embeddings().weight.float().cpu()  # (vocab, d_model)
    gain = final_norm_gain(model)
    tokenizer = model.tokenizer
    out = []
    for layer, feature in features:
        logits = unembed @ (gain * decoder_direction(model, layer, feature))
        top = torch.topk(logits, k)
        bottom = torch.topk(-logits, k)

        def tokens(ids: torch.Tensor, values: torch.Tensor) -> list[LensToken]:
            return [
                LensToken(tokenizer.decode([int(i)]), int(i), float(v)) for i, v in zip(ids, values)
            ]

        out.append(
            LogitLens(
                int(layer),
                int(feature),
                tokens(top.indices, top.values),
                tokens(bottom.indices, -bottom.values),
            )
        )
    return out

"""Attention patterns frozen to a clean run's, in the real model's own forward pass.

circuit-tracer's feature interventions freeze attention by default: each layer's pattern
(the softmax output, after masking and softcapping) keeps the value it had on the prompt
without interventions, while values, projections, norms and MLPs respond. Here the same
freeze runs on the Hugging Face model itself, so that many interventions of one prompt can
share one batched forward pass (:func:`~em_circuits.models.hooks.real_model_last_logits`):
a clean eager pass records every layer's pattern, then an attention function registered
with transformers' ``AttentionInterface`` multiplies the values by the recorded pattern.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: The attention implementation's name while patterns are frozen.
FROZEN_PATTERNS = "em_circuits_frozen_patterns"
# The recorded pattern of one attention module (1, heads, queries, keys), on the module.
_PATTERN = "_em_circuits_frozen_pattern"


def _frozen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager attention's output with the module's recorded pattern: ``pattern @ V``,
    grouped-query value heads repeated as ``repeat_kv`` repeats them."""
    pattern: torch.Tensor = getattr(module, _PATTERN)
    groups = query.shape[1] // value.shape[1]
    values = value.repeat_interleave(groups, dim=1)
    weights = pattern.to(values.dtype).expand(values.shape[0], -1, -1, -1)
    out = torch.matmul(weights, values)
    return out.transpose(1, 2).contiguous(), weights


def _register() -> None:
    """Make the frozen attention one of transformers' attention implementations (once)."""
    from transformers import AttentionInterface

    if FROZEN_PATTERNS not in AttentionInterface._global_mapping:
        AttentionInterface.register(FROZEN_PATTERNS, _frozen_attention)


def _attention_modules(hf_model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Each decoder layer's attention module, by its ``layer_idx``."""
    found: dict[int, torch.nn.Module] = {}
    for module in hf_model.modules():
        layer = getattr(module, "layer_idx", None)
        if type(module).__name__.endswith("Attention") and isinstance(layer, int):
            found[layer] = module
    return found


@contextmanager
@torch.no_grad()
def patterns_frozen(hf_model: torch.nn.Module, ids: torch.Tensor) -> Iterator[None]:
    """While inside, every forward pass of ``hf_model`` (any batch of the prompt ``ids``, one
    row of positions) uses the attention patterns of a clean pass of ``ids``."""
    device = next(hf_model.parameters()).device
    clean = hf_model(ids.reshape(1, -1).to(device), output_attentions=True, use_cache=False)
    modules = _attention_modules(hf_model)
    if not clean.attentions or any(a is None for a in clean.attentions):
        raise ValueError("the model returned no attention patterns (needs eager attention)")
    if len(modules) != len(clean.attentions):
        raise ValueError(
            f"found {len(modules)} attention modules for {len(clean.attentions)} layers' patterns"
        )
    _register()
    config: Any = hf_model.config
    before = config._attn_implementation
    try:
        for layer, pattern in enumerate(clean.attentions):
            setattr(modules[layer], _PATTERN, pattern.detach())
        config._attn_implementation = FROZEN_PATTERNS
        yield
    finally:
        config._attn_implementation = before
        for module in modules.values():
            if hasattr(module, _PATTERN):
                delattr(module, _PATTERN)

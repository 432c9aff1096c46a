"""Which model architectures circuit-tracer's nnsight backend can trace; Qwen2 added.

circuit-tracer 0.5 maps module locations (where attention patterns and layer-norm scales are
frozen, where transcoders read and write) per architecture class. Qwen2 / Qwen2.5, the most
common emergent-misalignment organisms, are missing: their modules are laid out as Qwen3's
(whose q/k norms sit inside the attention, which is frozen anyway), so Qwen3's mapping is
registered under ``Qwen2ForCausalLM`` too. Qwen2's config has no ``head_dim`` field, which
circuit-tracer's config conversion reads, so it is derived (``hidden_size / n_heads``, the
value the model itself uses) before the model is built.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from em_circuits.models.spec import ModelLoadError

#: Architectures registered here on top of circuit-tracer's own, by the one they copy.
EXTRA_ARCHITECTURES = {"Qwen2ForCausalLM": "Qwen3ForCausalLM"}


def register_extra_architectures() -> None:
    """Add :data:`EXTRA_ARCHITECTURES` to circuit-tracer's registry (idempotent)."""
    from circuit_tracer.utils import tl_nnsight_mapping as mapping

    known = mapping.get_supported_architectures()
    for name, like in EXTRA_ARCHITECTURES.items():
        if name not in known:
            template = mapping.get_mapping(like)
            hooks = dict(template.feature_hook_mapping)
            # The residual stream before the MLP and the MLP output, as for Llama.
            hooks.setdefault(
                "hook_resid_mid", ("model.layers[{layer}].post_attention_layernorm", "input")
            )
            hooks.setdefault("hook_mlp_out", ("model.layers[{layer}].mlp", "output"))
            mapping._register(
                dataclasses.replace(template, model_architecture=name, feature_hook_mapping=hooks)
            )


def supported_architectures() -> list[str]:
    from circuit_tracer.utils.tl_nnsight_mapping import get_supported_architectures

    register_extra_architectures()
    return sorted(get_supported_architectures())


def architecture_of(config: Any) -> str:
    names = getattr(config, "architectures", None) or []
    return str(names[0]) if names else type(config).__name__.replace("Config", "ForCausalLM")


def check_traceable(config: Any, transcoders: Any, where: str) -> str:
    """The architecture name; a one-line ModelLoadError when circuit-tracer cannot trace it or
    the transcoders' hooks do not exist for it."""
    from circuit_tracer.utils.tl_nnsight_mapping import get_mapping

    architecture = architecture_of(config)
    supported = supported_architectures()
    if architecture not in supported:
        raise ModelLoadError(
            f"{where}: architecture {architecture} cannot be traced by circuit-tracer's nnsight "
            f"backend; supported: {', '.join(supported)}"
        )
    hooks = get_mapping(architecture).feature_hook_mapping
    module = getattr(transcoders, "_module", transcoders)
    for side in ("feature_input_hook", "feature_output_hook"):
        hook = getattr(module, side, None)
        if hook not in hooks:
            raise ModelLoadError(
                f"{where}: the transcoders' {side} {hook!r} does not exist for {architecture}; "
                f"use transcoders with one of: {', '.join(sorted(hooks))}"
            )
    return architecture


def _device_map(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"": device.index if device.index is not None else 0}
    return {"": device.type}


def load_replacement(
    weights_dir: Path | str, transcoders: Any, device: torch.device, dtype: torch.dtype
) -> Any:
    """circuit-tracer's nnsight replacement model of the weights in ``weights_dir``."""
    from circuit_tracer import ReplacementModel
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(weights_dir)
    check_traceable(config, transcoders, str(weights_dir))
    if getattr(config, "head_dim", None) is not None:
        return ReplacementModel.from_pretrained_and_transcoders(
            str(weights_dir), transcoders, backend="nnsight", device=device, dtype=dtype
        )
    # circuit-tracer loads the config itself and reads head_dim from it: build the model the
    # way its from_pretrained_and_transcoders does, from a config with head_dim derived.
    from circuit_tracer.replacement_model.replacement_model_nnsight import NNSightReplacementModel
    from nnsight import LanguageModel

    config.head_dim = config.hidden_size // config.num_attention_heads
    model = NNSightReplacementModel.__new__(NNSightReplacementModel)
    LanguageModel.__init__(
        model,
        str(weights_dir),
        config=config,
        device_map=_device_map(device),
        dispatch=True,
        dtype=dtype,
        attn_implementation="eager",
    )
    model._hf_config = config
    model._configure_replacement_model(transcoders)
    return model

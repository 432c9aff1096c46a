"""The LoRA adapter's factors: read from its PEFT folder, and the model modules they adapt.

A LoRA update of a module is ``dW = s B A`` (``A``: r x d_in, ``B``: d_out x r, ``s`` =
alpha / r, or alpha / sqrt(r) with rsLoRA); :mod:`~em_circuits.attribution.adapter_nodes`
makes its writes graph nodes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from em_circuits.models.load import decoder_layers
from em_circuits.models.spec import ModelLoadError, resolve_model_dir

_LORA_KEY = re.compile(
    r"(?:base_model\.model\.)?(?:model\.)?(?:language_model\.)?layers\.(\d+)\."
    r"(?:mlp|self_attn)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight"
)


class UnsupportedAdapterError(ModelLoadError):
    """An adapter whose writes cannot be nodes (DoRA, an MLP output normalised after
    down_proj, a file layout not read here)."""


@dataclass(frozen=True)
class LoraFactor:
    """One LoRA-adapted module: ``dW = scale * B @ A``."""

    layer: int
    module: str
    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """``s A x`` for an input ``x`` (..., d_in): the r activations, (..., r)."""
        return self.scale * (x @ self.A.to(x).T)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``s B A x``: what the update adds to the module's output on ``x``."""
        return self.scale * ((x @ self.A.to(x).T) @ self.B.to(x).T)

    def weight(self, like: torch.Tensor) -> torch.Tensor:
        """``s B A`` as a weight matrix in ``like``'s dtype and device."""
        return self.scale * (self.B.to(like) @ self.A.to(like))


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's per-module override (rank_pattern, alpha_pattern): a key matches a module whose
    full name ends with it (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def read_lora_factors(adapter_dir: Path) -> list[LoraFactor]:
    """Every LoRA factor of a PEFT adapter folder, with its scale; sorted by layer, module."""
    config_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise UnsupportedAdapterError(
            f"{adapter_dir}: adapter nodes need adapter_config.json and adapter_model.safetensors"
        )
    config = json.loads(config_path.read_text())
    if config.get("use_dora"):
        raise UnsupportedAdapterError(
            f"{adapter_dir}: a DoRA adapter rescales whole weight columns, not a low-rank write"
        )
    halves: dict[tuple[int, str, str], torch.Tensor] = {}
    names: dict[tuple[int, str], str] = {}
    with safe_open(str(weights), "pt") as handle:
        for key in handle.keys():
            match = _LORA_KEY.fullmatch(key)
            if match:
                layer, module, side = int(match[1]), match[2], match[3]
                halves[layer, module, side] = handle.get_tensor(key).float()
                names[layer, module] = key.split(".lora_")[0]
    factors = []
    for (layer, module), name in sorted(names.items()):
        A, B = halves.get((layer, module, "A")), halves.get((layer, module, "B"))
        if A is None or B is None:
            raise UnsupportedAdapterError(f"{weights}: {name} has only one of lora_A, lora_B")
        rank = int(A.shape[0])
        alpha = float(
            _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", rank))
        )
        scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
        factors.append(LoraFactor(layer, module, A, B, scale))
    return factors


def adapted_module(hf_model: torch.nn.Module, layer: int, module: str) -> torch.nn.Module:
    """The module named ``module`` (``down_proj``, ``q_proj``, ...) of decoder layer ``layer``."""
    block = decoder_layers(hf_model)[layer]
    for parent in ("mlp", "self_attn"):
        owner = getattr(block, parent, None)
        if owner is not None and hasattr(owner, module):
            found: torch.nn.Module = getattr(owner, module)
            return found
    raise UnsupportedAdapterError(f"layer {layer} of the model has no module {module!r}")


def layer_attention(hf_model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The attention module of decoder layer ``layer``."""
    attention = getattr(decoder_layers(hf_model)[layer], "self_attn", None)
    if not isinstance(attention, torch.nn.Module):
        raise UnsupportedAdapterError(f"layer {layer} of the model has no self_attn module")
    return attention


def layer_mlp(hf_model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The MLP module of decoder layer ``layer``."""
    mlp = getattr(decoder_layers(hf_model)[layer], "mlp", None)
    if mlp is None:
        raise UnsupportedAdapterError(f"layer {layer} of the model has no mlp module")
    return mlp


_FACTORS: dict[str, list[LoraFactor]] = {}


def model_lora_factors(model: Any) -> list[LoraFactor]:
    """The LoRA factors of a loaded adapted model's adapter (read once per process)."""
    spec = model.spec
    if spec.adapter is None:
        return []
    key = f"{spec.adapter}@{spec.adapter_revision}"
    if key not in _FACTORS:
        _FACTORS[key] = read_lora_factors(
            resolve_model_dir(spec.adapter, spec.adapter_revision, "adapter")
        )
    return _FACTORS[key]

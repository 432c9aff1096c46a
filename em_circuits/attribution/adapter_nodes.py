"""The LoRA adapter as graph nodes: where it writes into the residual stream, per position.

A LoRA update of a module is ``dW = s B A`` (``A``: r x d_in, ``B``: d_out x r, ``s`` =
alpha / r, or alpha / sqrt(r) with rsLoRA). On an input ``x`` it adds ``s B (A x)``: ``r``
scalar activations ``a_j = s A_j . x`` times fixed directions ``B_j`` (the columns of B).

For ``down_proj`` that sum is part of the MLP output the transcoder reconstructs; what the
transcoder misses is the MLP's error node. In the adapted model the adapter's part of the MLP
output is known exactly, so each ``(layer, down_proj, j, position)`` becomes a node of its
own: a constant write ``a_j B_j`` into the MLP output, scored like an error node (its direct
and total effect on a target is the target's gradient there, in the direct and in the total
rows of the totals backward, dotted with the write), and carved out of the error node, which
keeps the remainder. By linearity the error node's effect without adapter nodes equals its
remainder's plus the adapter nodes' effects at that layer and position, exactly.

Position 0 gets no adapter node, as it gets no feature and no error node: circuit-tracer
zeroes those at BOS. Adapter nodes exist only where the module's output is the output
circuit-tracer's transcoder replaces (checked on the first prompt: a model that normalises the
MLP output after ``down_proj``, as Gemma-2 does, gets none, with the reason).

Other modules (``o_proj``, ``v_proj`` through the frozen pattern; ``gate_proj``, ``up_proj``,
``q_proj``, ``k_proj`` through nonlinearities) are not nodes yet; the attribution records which
adapter modules the graph leaves in its other nodes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from em_circuits.models.spec import ModelLoadError

#: Adapter modules whose writes become nodes, in the order their codes name them.
NODE_MODULES = ("down_proj",)

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


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's per-module override (rank_pattern, alpha_pattern): a key matches a module whose
    full name ends with it (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def read_lora_factors(adapter_dir: Path) -> list[LoraFactor]:
    """Every LoRA factor of a PEFT adapter folder, with its scale; sorted by layer, module."""
    from safetensors import safe_open

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


@dataclass
class AdapterWrites:
    """One prompt's adapter nodes: which they are, their activations and their writes."""

    #: (n_nodes, 4) int64: layer, module code (index into ``modules``), component, position;
    #: ordered by layer, position, module, component (the order the backward scores them).
    nodes: torch.Tensor
    activations: torch.Tensor  # (n_nodes,) float32: a_j at the node's position
    #: layer -> (n_pos, nodes per position, d_model) float32: a_j B_j at each position
    writes: dict[int, torch.Tensor] = field(default_factory=dict)
    modules: list[str] = field(default_factory=lambda: list(NODE_MODULES))
    #: adapted modules that are not nodes, as "module@layers" (their effect stays in other
    #: nodes: features, errors, attention)
    not_nodes: list[str] = field(default_factory=list)

    @property
    def n_nodes(self) -> int:
        return int(self.nodes.shape[0])


def _module_of(hf_model: torch.nn.Module, layer: int, module: str) -> torch.nn.Module:
    from em_circuits.models.load import decoder_layers

    block = decoder_layers(hf_model)[layer]
    for parent in ("mlp", "self_attn"):
        owner = getattr(block, parent, None)
        if owner is not None and hasattr(owner, module):
            found: torch.nn.Module = getattr(owner, module)
            return found
    raise UnsupportedAdapterError(f"layer {layer} of the model has no module {module!r}")


@torch.no_grad()
def adapter_writes(
    hf_model: torch.nn.Module,
    input_ids: torch.Tensor,
    factors: list[LoraFactor],
    mlp_output_site: Any = None,
    zero_positions: int = 1,
) -> AdapterWrites:
    """The adapter nodes of one prompt (``input_ids``, as attribution feeds them) in the
    adapted model ``hf_model``. ``mlp_output_site(layer)`` gives the (module, side) where the
    transcoder's output is written (``analysis.intervene.hook_sites``); there, the MLP output
    must equal ``down_proj``'s, else the writes are not the replaced output and this raises
    :class:`UnsupportedAdapterError`."""
    from em_circuits.analysis.intervene import record_input_at  # records any site's value

    node_factors = [f for f in factors if f.module in NODE_MODULES]
    others: dict[str, list[int]] = {}
    for f in factors:
        if f.module not in NODE_MODULES:
            others.setdefault(f.module, []).append(f.layer)
    not_nodes = [f"{m}@{','.join(map(str, sorted(set(ls))))}" for m, ls in sorted(others.items())]
    if not node_factors:
        return AdapterWrites(
            torch.zeros(0, 4, dtype=torch.long), torch.zeros(0), not_nodes=not_nodes
        )
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    site_outputs: dict[int, torch.Tensor] = {}
    handles = []

    def keep(key: tuple[int, str]):
        def hook(_module, args, output):
            inputs[key] = args[0][0].float()
            outputs[key] = output[0].float()

        return hook

    try:
        for f in node_factors:
            module = _module_of(hf_model, f.layer, f.module)
            handles.append(module.register_forward_hook(keep((f.layer, f.module))))
            if mlp_output_site is not None and f.module == "down_proj":
                handles.append(record_input_at(mlp_output_site(f.layer), f.layer, site_outputs))
        device = next(hf_model.parameters()).device
        hf_model(input_ids.reshape(1, -1).to(device))
    finally:
        for handle in handles:
            handle.remove()

    acts_by_layer: dict[int, list[torch.Tensor]] = {}
    writes_by_layer: dict[int, list[torch.Tensor]] = {}
    codes_by_layer: dict[int, list[tuple[int, int]]] = {}
    for f in node_factors:
        x = inputs[f.layer, f.module]  # (n_pos, d_in)
        if f.module == "down_proj" and f.layer in site_outputs:
            written, replaced = outputs[f.layer, f.module], site_outputs[f.layer][0].float()
            scale = float(replaced.abs().max().clamp_min(1e-6))
            if not torch.allclose(written, replaced, atol=1e-3 * scale, rtol=1e-3):
                raise UnsupportedAdapterError(
                    f"layer {f.layer}: the MLP output the transcoders replace is not down_proj's "
                    "output (a norm after the MLP?), so down_proj's adapter writes are not "
                    "nodes of this graph"
                )
        a = f.scale * (x @ f.A.to(x.device).T)  # (n_pos, r)
        a[:zero_positions] = 0
        acts_by_layer.setdefault(f.layer, []).append(a)
        writes_by_layer.setdefault(f.layer, []).append(a[:, :, None] * f.B.to(x.device).T[None])
        codes_by_layer.setdefault(f.layer, []).append((NODE_MODULES.index(f.module), f.rank))
    writes, nodes, activations = {}, [], []
    for layer in sorted(acts_by_layer):
        acts = torch.cat(acts_by_layer[layer], dim=1)  # (n_pos, m): module-major components
        writes[layer] = torch.cat(writes_by_layer[layer], dim=1)  # (n_pos, m, d_model)
        n_pos, m = acts.shape
        codes = torch.cat([torch.full((r,), code) for code, r in codes_by_layer[layer]])
        components = torch.cat([torch.arange(r) for _, r in codes_by_layer[layer]])
        nodes.append(
            torch.stack(
                [
                    torch.full((n_pos * m,), layer),
                    codes.repeat(n_pos),
                    components.repeat(n_pos),
                    torch.arange(n_pos).repeat_interleave(m),
                ],
                1,
            )
        )
        activations.append(acts.reshape(-1).cpu())
    return AdapterWrites(
        torch.cat(nodes), torch.cat(activations), writes, list(NODE_MODULES), not_nodes
    )


_FACTORS: dict[str, list[LoraFactor]] = {}


def model_lora_factors(model: Any) -> list[LoraFactor]:
    """The LoRA factors of a loaded adapted model's adapter (read once per process)."""
    from em_circuits.models.spec import resolve_model_dir

    spec = model.spec
    if spec.adapter is None:
        return []
    key = f"{spec.adapter}@{spec.adapter_revision}"
    if key not in _FACTORS:
        _FACTORS[key] = read_lora_factors(
            resolve_model_dir(spec.adapter, spec.adapter_revision, "adapter")
        )
    return _FACTORS[key]


def prompt_adapter_writes(model: Any, input_ids: torch.Tensor) -> AdapterWrites | str:
    """A loaded adapted model's adapter nodes for one prompt, or why it has none."""
    from em_circuits.analysis.intervene import (
        UnsupportedInterventionError,
        hook_sites,
        transcoder_set,
    )

    try:
        factors = model_lora_factors(model)
        transcoders = transcoder_set(model)
        layers = {f.layer for f in factors if f.module in NODE_MODULES}
        try:
            sites = {layer: hook_sites(model.hf_model, transcoders, layer)[1] for layer in layers}
        except (AttributeError, KeyError) as err:  # a site below a module (Gemma-2's norms)
            return (
                "the MLP output the transcoders replace is not a module output here "
                f"({type(err).__name__}: {err}), so down_proj's writes are not nodes"
            )
        writes = adapter_writes(
            model.hf_model,
            input_ids,
            factors,
            mlp_output_site=sites.__getitem__,
            zero_positions=_zero_positions(model),
        )
    except (UnsupportedAdapterError, UnsupportedInterventionError) as err:
        return str(err)  # also a cross-layer set: its output sites are not one MLP's
    if not writes.n_nodes:
        adapted = ", ".join(writes.not_nodes) or "none"
        return (
            f"no adapted module writes nodes (adapted: {adapted}; nodes: {', '.join(NODE_MODULES)})"
        )
    return writes


def _zero_positions(model: Any) -> int:
    zero = getattr(model.replacement, "zero_positions", slice(0, 1))
    return int(zero.stop) if isinstance(zero, slice) and zero.stop is not None else 1

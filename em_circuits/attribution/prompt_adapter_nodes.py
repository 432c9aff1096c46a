"""One prompt's adapter nodes, measured in the adapted model: which modules' writes are nodes,
their activations and writes (:func:`adapter_writes`), and for a loaded model the nodes or why
it has none (:func:`prompt_adapter_writes`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from em_circuits.attribution.adapter_nodes import (
    ATTENTION_LINEAR,
    ATTENTION_PATTERN,
    MLP_LINEAR,
    MLP_NONLINEAR,
    NODE_MODULES,
    AdapterWrites,
    AttentionWrite,
    PatternWrite,
)
from em_circuits.attribution.lora_factors import (
    LoraFactor,
    UnsupportedAdapterError,
    adapted_module,
    layer_attention,
    layer_mlp,
    model_lora_factors,
)
from em_circuits.models.adapter_scope import spec_outside_changes
from em_circuits.models.hooks import (
    UnsupportedInterventionError,
    hook_sites,
    record_input_at,
    transcoder_set,
)


@contextmanager
def _update_removed(hf_model: torch.nn.Module, factor: LoraFactor) -> Iterator[None]:
    """While open, ``factor``'s module computes its output without the update."""
    module = adapted_module(hf_model, factor.layer, factor.module)
    handle = module.register_forward_hook(lambda _m, args, output: output - factor.update(args[0]))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _without_update(
    hf_model: torch.nn.Module, factor: LoraFactor, mlp_input: torch.Tensor
) -> torch.Tensor:
    """The MLP's output on ``mlp_input`` with ``factor``'s update taken out of its module."""
    with _update_removed(hf_model, factor):
        out: torch.Tensor = layer_mlp(hf_model, factor.layer)(mlp_input)
    return out


def _modules_at_layers(factors: list[LoraFactor]) -> list[str]:
    """``factors``' modules as "module@layers", one entry a module."""
    layers: dict[str, set[int]] = {}
    for f in factors:
        layers.setdefault(f.module, set()).add(f.layer)
    return [f"{m}@{','.join(map(str, sorted(ls)))}" for m, ls in sorted(layers.items())]


@dataclass
class _Recorded:
    """What one forward pass of the adapted model keeps for the adapter's nodes."""

    #: each linear node module's input, (n_pos, d_in) by (layer, module)
    inputs: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    #: each MLP layer's (input, output) with nodes
    mlp_io: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: each pattern layer's attention call (its arguments and weights), to call it again with
    #: one update taken out: its input does not depend on it, so nothing else needs running
    calls: dict[int, tuple[tuple, dict, torch.Tensor | None]] = field(default_factory=dict)
    #: each pattern layer's value projection input
    value_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    #: each MLP layer's value at the transcoders' output site, to check it is the MLP's
    sites: dict[int, torch.Tensor] = field(default_factory=dict)


@contextmanager
def _recording_hooks(
    hf_model: torch.nn.Module, node_factors: list[LoraFactor], mlp_output_site: Any
) -> Iterator[_Recorded]:
    """While open, every forward pass of ``hf_model`` (one prompt) records what every node
    kind needs into the yielded record."""
    recorded = _Recorded()
    inputs, mlp_io, calls = recorded.inputs, recorded.mlp_io, recorded.calls

    def keep_call(layer: int):
        def hook(_module, args, kwargs, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            calls[layer] = (args, kwargs, weights)

        return hook

    def keep_value_input(layer: int):
        def hook(_module, args, _output):
            recorded.value_inputs[layer] = args[0]

        return hook

    def keep_input(key: tuple[int, str]):
        def hook(_module, args, _output):
            inputs[key] = args[0][0]

        return hook

    def keep_mlp(layer: int):
        def hook(_module, args, output):
            mlp_io[layer] = (args[0], output)

        return hook

    mlp_modules = MLP_LINEAR + MLP_NONLINEAR
    mlp_layers = sorted({f.layer for f in node_factors if f.module in mlp_modules})
    pattern_layers = sorted({f.layer for f in node_factors if f.module in ATTENTION_PATTERN})
    handles = []
    try:
        for f in node_factors:
            if f.module not in ATTENTION_PATTERN:
                module = adapted_module(hf_model, f.layer, f.module)
                handles.append(module.register_forward_hook(keep_input((f.layer, f.module))))
        for layer in pattern_layers:
            attention = layer_attention(hf_model, layer)
            handles.append(attention.register_forward_hook(keep_call(layer), with_kwargs=True))
            value = adapted_module(hf_model, layer, "v_proj")
            handles.append(value.register_forward_hook(keep_value_input(layer)))
        for layer in mlp_layers:
            handles.append(layer_mlp(hf_model, layer).register_forward_hook(keep_mlp(layer)))
            if mlp_output_site is not None:
                handles.append(record_input_at(mlp_output_site(layer), layer, recorded.sites))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _recorded_forward(
    hf_model: torch.nn.Module,
    input_ids: torch.Tensor,
    node_factors: list[LoraFactor],
    mlp_output_site: Any,
) -> _Recorded:
    """One forward pass of ``input_ids`` of its own that keeps what every node kind needs."""
    with _recording_hooks(hf_model, node_factors, mlp_output_site) as recorded:
        device = next(hf_model.parameters()).device
        # no cache: the attention calls made again must not extend one
        hf_model(input_ids.reshape(1, -1).to(device), use_cache=False)
    return recorded


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
    transcoder's output is written (``models.hooks.hook_sites``); there, the MLP output
    must equal the MLP module's, else the MLP-output writes are not part of the replaced
    output and this raises :class:`UnsupportedAdapterError`."""
    node_factors = [f for f in factors if f.module in NODE_MODULES]
    not_nodes = _modules_at_layers([f for f in factors if f.module not in NODE_MODULES])
    if not node_factors:
        return AdapterWrites(
            torch.zeros(0, 4, dtype=torch.long), torch.zeros(0), not_nodes=not_nodes
        )
    recorded = _recorded_forward(hf_model, input_ids, node_factors, mlp_output_site)
    return writes_from_recording(hf_model, recorded, factors, zero_positions)


@torch.no_grad()
def writes_from_recording(
    hf_model: torch.nn.Module,
    recorded: _Recorded,
    factors: list[LoraFactor],
    zero_positions: int = 1,
) -> AdapterWrites:
    """:func:`adapter_writes` from a forward pass recorded by :func:`_recording_hooks` (the
    attention implementation still eager where pattern nodes are asked for)."""
    node_factors = [f for f in factors if f.module in NODE_MODULES]
    not_nodes = _modules_at_layers([f for f in factors if f.module not in NODE_MODULES])
    for layer, (_, output) in sorted(recorded.mlp_io.items()):
        _check_replaced_output(layer, output[0].float(), recorded.sites.get(layer))
    inputs, mlp_io = recorded.inputs, recorded.mlp_io

    acts_by_layer: dict[int, list[torch.Tensor]] = {}
    writes_by_layer: dict[int, list[torch.Tensor]] = {}
    codes_by_layer: dict[int, list[tuple[int, int]]] = {}
    attention = []
    patterns = _pattern_writes(hf_model, recorded, factors, zero_positions)
    for f in node_factors:
        code = NODE_MODULES.index(f.module)
        if f.module in ATTENTION_PATTERN:
            continue
        if f.module in MLP_NONLINEAR:
            x_mlp, out = mlp_io[f.layer]
            diff = (out - _without_update(hf_model, f, x_mlp))[0].float()  # (n_pos, d_model)
            diff[:zero_positions] = 0
            acts_by_layer.setdefault(f.layer, []).append(diff.norm(dim=-1, keepdim=True))
            writes_by_layer.setdefault(f.layer, []).append(diff[:, None])
            codes_by_layer.setdefault(f.layer, []).append((code, 1))
            continue
        x = inputs[f.layer, f.module].float()  # (n_pos, d_in)
        a = f.activation(x)  # (n_pos, r)
        a[:zero_positions] = 0
        if f.module in ATTENTION_LINEAR:
            attention.append(AttentionWrite(f, a.cpu(), zero_positions))
            continue
        acts_by_layer.setdefault(f.layer, []).append(a)
        writes_by_layer.setdefault(f.layer, []).append(a[:, :, None] * f.B.to(x.device).T[None])
        codes_by_layer.setdefault(f.layer, []).append((code, f.rank))
    writes, nodes, activations = {}, [], []
    for layer in sorted(acts_by_layer):
        acts = torch.cat(acts_by_layer[layer], dim=1)  # (n_pos, m): module-major components
        writes[layer] = torch.cat(writes_by_layer[layer], dim=1)  # (n_pos, m, d_model)
        nodes.append(_node_table(layer, codes_by_layer[layer], acts.shape[0]))
        activations.append(acts.reshape(-1).cpu())
    for write in attention:
        code = NODE_MODULES.index(write.factor.module)
        n_pos = len(write.activations)
        nodes.append(_node_table(write.factor.layer, [(code, write.factor.rank)], n_pos))
        activations.append(write.activations.reshape(-1))
    for pattern in patterns:
        code = NODE_MODULES.index(pattern.factor.module)
        nodes.append(_node_table(pattern.factor.layer, [(code, 1)], len(pattern.values)))
        activations.append(pattern.values.norm(dim=-1).cpu())
    return AdapterWrites(
        nodes=torch.cat(nodes),
        activations=torch.cat(activations).float(),
        writes=writes,
        attention=attention,
        patterns=patterns,
        modules=list(NODE_MODULES),
        not_nodes=not_nodes,
        factors=node_factors,
    )


def _base_weight(merged: torch.Tensor, factor: LoraFactor | None) -> torch.Tensor:
    """A merged module's weight without its update (as it is where there is none)."""
    return merged if factor is None else merged - factor.weight(merged)


@torch.no_grad()
def _pattern_writes(
    hf_model: torch.nn.Module, recorded: _Recorded, factors: list[LoraFactor], zero: int
) -> list[PatternWrite]:
    """The attention-pattern nodes of one prompt: for each q_proj or k_proj factor, its
    layer's attention pattern with and without the update (the model's own eager
    attention, so masks, rotary embeddings, softcapping and norms are its own)."""
    chosen = [f for f in factors if f.module in ATTENTION_PATTERN]
    if not chosen:
        return []
    by_key = {(f.layer, f.module): f for f in factors}
    calls, value_inputs = recorded.calls, recorded.value_inputs
    out = []
    for f in chosen:
        args, kwargs, adapted = calls[f.layer]
        if adapted is None:
            raise UnsupportedAdapterError(
                "q_proj/k_proj nodes need the attention weights (eager attention)"
            )
        with _update_removed(hf_model, f):
            without = layer_attention(hf_model, f.layer)(*args, **kwargs)[1]
        v_proj = adapted_module(hf_model, f.layer, "v_proj")
        o_proj = adapted_module(hf_model, f.layer, "o_proj")
        v_weight = torch.as_tensor(v_proj.weight).float()
        o_weight = torch.as_tensor(o_proj.weight).float()
        v_bias = v_proj.bias
        pattern = PatternWrite(
            factor=f,
            pattern_change=(adapted[0] - without[0]).float(),
            v_weight=_base_weight(v_weight, by_key.get((f.layer, "v_proj"))),
            v_bias=None if v_bias is None else torch.as_tensor(v_bias).float(),
            o_weight=_base_weight(o_weight, by_key.get((f.layer, "o_proj"))),
            values=torch.zeros(0),
            zero_positions=zero,
        )
        pattern.values = pattern.value(value_inputs[f.layer].float())[0]
        out.append(pattern)
    return out


def _node_table(layer: int, codes: list[tuple[int, int]], n_pos: int) -> torch.Tensor:
    """(n_pos * m, 4) rows (layer, module code, component, position), position-major, for
    modules ``codes`` = [(code, rank), ...] in that order."""
    module_codes = torch.cat([torch.full((r,), code) for code, r in codes])
    components = torch.cat([torch.arange(r) for _, r in codes])
    m = len(components)
    return torch.stack(
        [
            torch.full((n_pos * m,), layer),
            module_codes.repeat(n_pos),
            components.repeat(n_pos),
            torch.arange(n_pos).repeat_interleave(m),
        ],
        1,
    )


def _check_replaced_output(
    layer: int, written: torch.Tensor, replaced: torch.Tensor | None
) -> None:
    if replaced is None:
        return
    replaced = replaced[0].float()
    scale = float(replaced.abs().max().clamp_min(1e-6))
    if not torch.allclose(written, replaced, atol=1e-3 * scale, rtol=1e-3):
        raise UnsupportedAdapterError(
            f"layer {layer}: the MLP output the transcoders replace is not the MLP module's "
            "output (a norm after the MLP?), so the adapter's MLP writes are not nodes of "
            "this graph"
        )


@dataclass
class AdapterPlan:
    """What a loaded adapted model's adapter nodes are, before any prompt: the factors whose
    writes are nodes, where the transcoders write each MLP's output, and the modules left
    out (with why)."""

    factors: list[LoraFactor]
    #: (module, side) of the transcoders' output per MLP layer, checked against the MLP's own
    sites: dict[int, Any]
    zero_positions: int
    #: the adapted modules that are not nodes beyond those the writes name
    not_nodes: list[str]

    @property
    def node_factors(self) -> list[LoraFactor]:
        return [f for f in self.factors if f.module in NODE_MODULES]

    @property
    def site_of(self) -> Any:
        """``layer -> (module, side)`` of the transcoders' output, or None (not checked)."""
        return self.sites.__getitem__ if self.sites else None

    def recording(self, hf_model: torch.nn.Module) -> AdapterRecording:
        """Hooks that record one forward pass for :meth:`AdapterRecording.writes` (the torch
        engine opens them around its own frozen forward pass: no pass of their own)."""
        return AdapterRecording(self, hf_model)

    def writes_for(self, hf_model: torch.nn.Module, input_ids: torch.Tensor) -> AdapterWrites | str:
        """One prompt's adapter nodes from a forward pass of their own, or why it has none."""
        return self.finished(
            lambda: adapter_writes(
                hf_model, input_ids, self.factors, self.site_of, self.zero_positions
            )
        )

    def finished(self, compute: Callable[[], AdapterWrites]) -> AdapterWrites | str:
        """The nodes ``compute`` finds, with the modules left out named, or why there are
        none (an unsupported adapter or intervention, or no module that writes nodes)."""
        try:
            writes = compute()
        except (UnsupportedAdapterError, UnsupportedInterventionError) as err:
            return str(err)
        writes.not_nodes += self.not_nodes
        if not writes.n_nodes:
            adapted = ", ".join(writes.not_nodes) or "none"
            return (
                f"no adapted module writes nodes (adapted: {adapted}; nodes: "
                f"{', '.join(NODE_MODULES)})"
            )
        return writes


class AdapterRecording:
    """One prompt's forward pass, recorded for its adapter nodes: open :meth:`hooks` around
    the pass (one prompt, eager attention where there are pattern nodes), then call
    :meth:`writes` while the attention is still eager."""

    def __init__(self, plan: AdapterPlan, hf_model: torch.nn.Module) -> None:
        self.plan = plan
        self.hf_model = hf_model
        self.recorded: _Recorded | None = None

    @contextmanager
    def hooks(self) -> Iterator[None]:
        factors = self.plan.node_factors
        with _recording_hooks(self.hf_model, factors, self.plan.site_of) as recorded:
            yield
        self.recorded = recorded

    def writes(self) -> AdapterWrites | str:
        """The prompt's adapter nodes, or why it has none."""
        recorded = self.recorded
        if recorded is None:
            raise RuntimeError("no forward pass was recorded")
        plan = self.plan
        return plan.finished(
            lambda: writes_from_recording(
                self.hf_model, recorded, plan.factors, plan.zero_positions
            )
        )


def adapter_plan(model: Any) -> AdapterPlan | str:
    """A loaded adapted model's :class:`AdapterPlan`, or why it has no adapter nodes."""
    try:
        factors = model_lora_factors(model)
        transcoders = transcoder_set(model)
        mlp_modules = MLP_LINEAR + MLP_NONLINEAR
        layers = {f.layer for f in factors if f.module in mlp_modules}
        unplaced = ""
        sites = {layer: hook_sites(model.hf_model, transcoders, layer)[1] for layer in layers}
        elsewhere = [
            layer
            for layer, site in sites.items()
            if site != (layer_mlp(model.hf_model, layer), "output")
        ]
        if elsewhere:  # Gemma-2's transcoders write after the post-feedforward norm
            unplaced = (
                f"the transcoders replace another value than the MLP output (layer "
                f"{elsewhere[0]}: after a norm), so the adapter's MLP writes are not nodes"
            )
            if not any(f.module in ATTENTION_LINEAR + ATTENTION_PATTERN for f in factors):
                return unplaced
            sites = {}
    except (UnsupportedAdapterError, UnsupportedInterventionError) as err:
        return str(err)  # also a cross-layer set: its output sites are not one MLP's
    kept = [f for f in factors if not (unplaced and f.module in mlp_modules)]
    left_out = [f for f in factors if f.module in mlp_modules] if unplaced else []
    return AdapterPlan(
        factors=kept,
        sites=sites,
        zero_positions=_zero_positions(model),
        not_nodes=_modules_at_layers(left_out) + spec_outside_changes(model.spec),
    )


def prompt_adapter_writes(model: Any, input_ids: torch.Tensor) -> AdapterWrites | str:
    """A loaded adapted model's adapter nodes for one prompt, or why it has none (a forward
    pass of its own; the torch engine records its frozen pass instead, see
    :meth:`AdapterPlan.recording`)."""
    plan = adapter_plan(model)
    return plan if isinstance(plan, str) else plan.writes_for(model.hf_model, input_ids)


def _zero_positions(model: Any) -> int:
    zero = getattr(model.replacement, "zero_positions", slice(0, 1))
    return int(zero.stop) if isinstance(zero, slice) and zero.stop is not None else 1

"""The LoRA adapter as graph nodes: where it writes into the residual stream, per position.

A LoRA update of a module is ``dW = s B A`` (``A``: r x d_in, ``B``: d_out x r, ``s`` =
alpha / r, or alpha / sqrt(r) with rsLoRA). On an input ``x`` it adds ``s B (A x)``: ``r``
scalar activations ``a_j = s A_j . x`` times fixed directions ``B_j`` (the columns of B).
Three kinds of module become nodes, each (layer, module, component j, position) one node:

* ``down_proj`` (linear): its update is part of the MLP output the transcoder reconstructs;
  what the transcoder misses is the MLP's error node. Each node is a constant write
  ``a_j B_j`` into the MLP output, scored like an error node (the target's gradient there, in
  the direct and in the total rows of the totals backward, dotted with the write), and carved
  out of the error node, which keeps the remainder. By linearity the error node's effect
  without adapter nodes equals its remainder's plus the adapter nodes' at that layer and
  position, exactly.
* ``o_proj``, ``v_proj`` (linear through the frozen attention pattern): the update is taken
  out of the module's output and added back detached, like an error node, so the gradient
  through attention follows the base weights and the update's write ``a_j B_j`` (at the
  module's output; for ``v_proj`` mixed over positions by the frozen pattern and ``o_proj``)
  is scored with the gradient at that output.
* ``gate_proj``, ``up_proj`` (through the MLP's nonlinearity): one node per position (j = 0)
  carrying the measured difference the module's update makes to the MLP output (the MLP run
  on the same input with and without it), carved out of the error node like ``down_proj``'s.
  Not linear: their activation is the difference's norm, their read has no edges, and the
  differences of several such modules need not add up to their joint difference.
* ``q_proj``, ``k_proj`` change the attention pattern, which the attribution freezes at the
  adapted model's: one node per query position (j = 0) carrying the change of the attention
  output the pattern change makes through the base value and output weights,
  ``(P - P_without) V_base W_O,base`` (the rest of that change, through the value and output
  updates, belongs to the ``v_proj`` and ``o_proj`` nodes). Linear in the attention input
  under frozen patterns, it is detached at the attention output like an attention node; not
  linear in the update (their activation is the write's norm, they have no reads, and the
  nodes of q_proj and k_proj at one layer need not add up to their joint change).

In the rows of total effects nothing is detached: total effects pass through attention and
attention-pattern nodes as through features (the features' total effects are those of a graph
without adapter nodes); MLP-output nodes are sources, as error nodes are.

Position 0 gets no adapter node activity, as it gets no feature and no error node:
circuit-tracer zeroes those at BOS. MLP-output nodes exist only where the module's output is
the output circuit-tracer's transcoder replaces (checked on each prompt: a model that
normalises the MLP output after ``down_proj``, as Gemma-2 does, gets none, with the reason).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from em_circuits.models.spec import ModelLoadError

#: Linear writes into the MLP output, carved out of the MLP error node.
MLP_LINEAR = ("down_proj",)
#: Linear writes through the frozen attention, detached at the module's output.
ATTENTION_LINEAR = ("o_proj", "v_proj")
#: Updates behind the MLP's nonlinearity: one node per position, the measured difference.
MLP_NONLINEAR = ("gate_proj", "up_proj")
#: Updates that change attention patterns: one node per query position, the change of the
#: attention output the pattern change makes through the base value and output weights.
ATTENTION_PATTERN = ("q_proj", "k_proj")
#: Adapter modules whose writes become nodes, in the order their codes name them.
NODE_MODULES = MLP_LINEAR + ATTENTION_LINEAR + MLP_NONLINEAR + ATTENTION_PATTERN
#: Nodes whose activation is not a linear read (one node per position, no reads).
NONLINEAR = MLP_NONLINEAR + ATTENTION_PATTERN

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


def _zeroed_before(t: torch.Tensor, positions: int) -> torch.Tensor:
    """``t`` (..., n_pos, d) with the first ``positions`` positions zeroed, out of place (the
    positions that have no nodes: circuit-tracer has no feature or error node there)."""
    keep = torch.ones(t.shape[-2], 1, dtype=t.dtype, device=t.device)
    keep[:positions] = 0
    return t * keep


@dataclass
class AttentionWrite:
    """One attention module's update as nodes. In the attribution forward pass the update is
    taken out of the module's output and added back detached (:func:`taped_adapter`),
    so each node ``a_j B_j`` is scored with the gradient at that output."""

    factor: LoraFactor
    activations: torch.Tensor  # (n_pos, r): a_j at each position (0 before zero_positions)
    zero_positions: int

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The update ``s B A x`` of input ``x`` (rows, n_pos, d_in), zero at the positions
        that have no nodes (so the attribution keeps it in the other nodes there)."""
        return _zeroed_before(self.factor.update(x), self.zero_positions)

    def scores(self, grad: torch.Tensor) -> torch.Tensor:
        """(n_pos * r, rows): each node's write dotted with ``grad`` (rows, n_pos, d_out), the
        gradient at the module's output; nodes position-major, components within."""
        per = (grad.float() @ self.factor.B.to(grad.device).float()) * self.activations.to(
            grad.device
        )
        return per.permute(1, 2, 0).reshape(-1, grad.shape[0])


@dataclass
class PatternWrite:
    """One q_proj or k_proj update as nodes: the change ``dP`` of its layer's attention
    pattern (the adapted pattern minus the pattern without this update) applied to the base
    values and output weights, ``dP V_base W_O,base``, one node per query position. Under
    frozen patterns that is linear in the attention input, so in the attribution forward
    pass it is taken out of the attention output and added back detached (direct rows), as
    an attention node is; the write is its value at the operating point."""

    factor: LoraFactor
    pattern_change: torch.Tensor  # (heads, n_pos, n_pos)
    v_weight: torch.Tensor  # (d_kv, d_in): the base value weight
    v_bias: torch.Tensor | None
    o_weight: torch.Tensor  # (d_model, heads * head_dim): the base output weight
    values: torch.Tensor  # (n_pos, d_model): each node's write
    zero_positions: int

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, n_pos, d_model) for the value projection's input ``x`` (rows, n_pos, d_in),
        zero at the positions that have no nodes."""
        v = x @ self.v_weight.to(x).T
        if self.v_bias is not None:
            v = v + self.v_bias.to(x)
        rows, n_pos, d_kv = v.shape
        heads = self.pattern_change.shape[0]
        head_dim = self.o_weight.shape[1] // heads
        kv_heads = d_kv // head_dim
        v = v.view(rows, n_pos, kv_heads, head_dim).transpose(1, 2)
        v = v.repeat_interleave(heads // kv_heads, dim=1)  # as transformers' repeat_kv
        z = (self.pattern_change.to(v) @ v).transpose(1, 2).reshape(rows, n_pos, -1)
        return _zeroed_before(z @ self.o_weight.to(z).T, self.zero_positions)

    def scores(self, grad: torch.Tensor) -> torch.Tensor:
        """(n_pos, rows): each node's write dotted with ``grad`` at the attention output."""
        return torch.einsum("bpd,pd->pb", grad.float(), self.values.to(grad.device).float())


@dataclass
class AdapterWrites:
    """One prompt's adapter nodes: which they are, their activations and their writes.

    Node order: the MLP-output nodes layer by layer (within a layer position-major, then
    module, then component: the order the backward scores them), then each attention
    module's nodes (position-major, then component), then each attention-pattern module's
    nodes (by position)."""

    #: (n_nodes, 4) int64: layer, module code (index into ``modules``), component, position
    nodes: torch.Tensor
    activations: torch.Tensor  # (n_nodes,) float32: a_j at the node's position
    #: MLP-output nodes, carved out of the error nodes: layer -> (n_pos, nodes per position,
    #: d_model) float32, each node's write at each position
    writes: dict[int, torch.Tensor] = field(default_factory=dict)
    #: attention-module nodes, detached at the module's output
    attention: list[AttentionWrite] = field(default_factory=list)
    #: attention-pattern nodes (q_proj, k_proj), detached at the attention output
    patterns: list[PatternWrite] = field(default_factory=list)
    modules: list[str] = field(default_factory=lambda: list(NODE_MODULES))
    #: adapted modules that are not nodes, as "module@layers" (their effect stays in other
    #: nodes: features, errors, attention)
    not_nodes: list[str] = field(default_factory=list)
    #: the LoRA factors of the modules that are nodes
    factors: list[LoraFactor] = field(default_factory=list)

    @property
    def n_nodes(self) -> int:
        return int(self.nodes.shape[0])

    def linear(self) -> torch.Tensor:
        """(n_nodes,) bool: nodes whose activation is a linear read (not gate, up, q, k)."""
        nonlinear = [NODE_MODULES.index(m) for m in NONLINEAR]
        return ~torch.isin(self.nodes[:, 1], torch.tensor(nonlinear))


@dataclass
class AdapterDetail:
    """One graph's adapter nodes with every edge computed (what the viewer draws): the nodes,
    their activations and effects on the targets, their edges into the listed features and
    from every node into the read ones. The stored graph keeps only sums of the edges."""

    nodes: torch.Tensor  # (n, 4)
    activations: torch.Tensor  # (n,)
    modules: list[str]
    direct: torch.Tensor  # (n_targets, n)
    total: torch.Tensor  # (n_targets, n)
    features: torch.Tensor  # (n_active, 3): layer, position, feature id
    target_kinds: list[str]
    target_token_ids: list[int]
    n_sources: int  # circuit-tracer's node layout: features, errors, tokens
    n_pos: int
    edge_features: torch.Tensor | None = None  # (k,) into features
    edges: torch.Tensor | None = None  # (k, n)
    read_nodes: torch.Tensor | None = None  # (m,) into the nodes
    reads: torch.Tensor | None = None  # (m, n_sources + n)

    @classmethod
    def of(cls, writes: AdapterWrites, effects: Any, graph: Any) -> AdapterDetail:
        """From a graph's adapter writes, its ``ExactEffects`` and its CompactGraph."""
        return cls(
            nodes=writes.nodes,
            activations=writes.activations,
            modules=writes.modules,
            direct=effects.adapter_direct,
            total=effects.adapter_total,
            features=effects.features,
            target_kinds=list(graph.target_kinds),
            target_token_ids=[int(t) for t in graph.target_token_ids],
            n_sources=int(effects.direct.shape[1]),
            n_pos=int(effects.n_pos),
            edge_features=effects.adapter_edge_features,
            edges=effects.adapter_edges,
            read_nodes=effects.adapter_read_nodes,
            reads=effects.adapter_reads,
        )


@dataclass
class AdapterTape:
    """What the attribution forward and backward passes record of the adapter: the gradient
    at each attention update's detached output (by its index in ``AdapterWrites.attention``;
    refilled by every backward pass) and each linear node module's activations ``s A x`` as
    tensors of the autograd graph, (rows, n_pos, r) by (layer, module), to differentiate."""

    #: the gradient at each detached update's output, by ("attention", index) or
    #: ("pattern", index) into ``AdapterWrites.attention`` / ``.patterns``
    grads: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    activations: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    #: the value projection's input at each layer with pattern nodes, this forward pass
    value_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    #: the batch rows [start, stop) of total effects: there nothing is detached and gradients
    #: pass through the adapter nodes, as through features; in every other row (direct
    #: effects) the attention updates are detached
    passing_rows: tuple[int, int] = (0, 0)

    def clear(self) -> None:
        """Forget every recorded tensor (they hold the forward pass's autograd graph)."""
        self.grads.clear()
        self.activations.clear()
        self.value_inputs.clear()


def _detached_rows(output: torch.Tensor, tape: AdapterTape) -> torch.Tensor:
    """(rows, 1, 1): 1 in the batch rows where updates are detached, 0 in the passing ones."""
    rows = torch.ones(output.shape[0], 1, 1, dtype=output.dtype, device=output.device)
    start, stop = tape.passing_rows
    rows[start:stop] = 0
    return rows


@contextmanager
def taped_adapter(
    hf_model: torch.nn.Module, adapter: AdapterWrites, tape: AdapterTape
) -> Iterator[None]:
    """While open, every forward pass of ``hf_model`` takes each attention update out of its
    module's output in the batch rows outside ``tape.passing_rows`` and adds it back detached
    (the value is unchanged and the gradient through attention follows the base weights:
    the update is a node of its own, reached only through its activation), records the
    gradient at each such module's output in ``tape``, and records every linear node
    module's activations in ``tape``."""
    handles = []

    def detached(output: torch.Tensor, part: torch.Tensor, key: tuple[str, int]):
        """``output`` with ``part`` of it detached in the detached rows, and a zero probe
        whose gradient (the gradient at the output) lands in ``tape.grads[key]``."""
        part = part.to(output.dtype) * _detached_rows(output, tape)
        probe = torch.zeros_like(output, requires_grad=True)
        probe.register_hook(lambda grad: tape.grads.__setitem__(key, grad))
        return output - part + part.detach() + probe

    def detach(index: int, write: AttentionWrite):
        def fn(_module, args, output):
            record(write.factor)(_module, args, output)
            return detached(output, write.update(args[0]), ("attention", index))

        return fn

    def record(f: LoraFactor):
        def fn(_module, args, _output):
            tape.activations[f.layer, f.module] = f.activation(args[0])

        return fn

    def value_input(layer: int):
        def fn(_module, args, _output):
            tape.value_inputs[layer] = args[0]

        return fn

    def detach_pattern(index: int, write: PatternWrite):
        def fn(_module, _args, output):
            value = write.value(tape.value_inputs[write.factor.layer])
            return detached(output, value, ("pattern", index))

        return fn

    try:
        for layer in sorted({w.factor.layer for w in adapter.patterns}):
            module = _module_of(hf_model, layer, "v_proj")
            handles.append(module.register_forward_hook(value_input(layer)))
        for index, pattern in enumerate(adapter.patterns):
            module = _module_of(hf_model, pattern.factor.layer, "o_proj")
            handles.append(module.register_forward_hook(detach_pattern(index, pattern)))
        for index, write in enumerate(adapter.attention):
            module = _module_of(hf_model, write.factor.layer, write.factor.module)
            handles.append(module.register_forward_hook(detach(index, write)))
        for f in adapter.factors:
            if f.module in MLP_LINEAR:
                module = _module_of(hf_model, f.layer, f.module)
                handles.append(module.register_forward_hook(record(f)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _module_of(hf_model: torch.nn.Module, layer: int, module: str) -> torch.nn.Module:
    from em_circuits.models.load import decoder_layers

    block = decoder_layers(hf_model)[layer]
    for parent in ("mlp", "self_attn"):
        owner = getattr(block, parent, None)
        if owner is not None and hasattr(owner, module):
            found: torch.nn.Module = getattr(owner, module)
            return found
    raise UnsupportedAdapterError(f"layer {layer} of the model has no module {module!r}")


def _attention_of(hf_model: torch.nn.Module, layer: int) -> torch.nn.Module:
    from em_circuits.models.load import decoder_layers

    attention = getattr(decoder_layers(hf_model)[layer], "self_attn", None)
    if not isinstance(attention, torch.nn.Module):
        raise UnsupportedAdapterError(f"layer {layer} of the model has no self_attn module")
    return attention


def _mlp_of(hf_model: torch.nn.Module, layer: int) -> torch.nn.Module:
    from em_circuits.models.load import decoder_layers

    mlp = getattr(decoder_layers(hf_model)[layer], "mlp", None)
    if mlp is None:
        raise UnsupportedAdapterError(f"layer {layer} of the model has no mlp module")
    return mlp


@contextmanager
def _update_removed(hf_model: torch.nn.Module, factor: LoraFactor) -> Iterator[None]:
    """While open, ``factor``'s module computes its output without the update."""
    module = _module_of(hf_model, factor.layer, factor.module)
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
        out: torch.Tensor = _mlp_of(hf_model, factor.layer)(mlp_input)
    return out


def _modules_at_layers(factors: list[LoraFactor]) -> list[str]:
    """``factors``' modules as "module@layers", one entry a module."""
    layers: dict[str, set[int]] = {}
    for f in factors:
        layers.setdefault(f.module, set()).add(f.layer)
    return [f"{m}@{','.join(map(str, sorted(ls)))}" for m, ls in sorted(layers.items())]


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
    from em_circuits.models.hooks import record_input_at  # records any site's value

    node_factors = [f for f in factors if f.module in NODE_MODULES]
    not_nodes = _modules_at_layers([f for f in factors if f.module not in NODE_MODULES])
    if not node_factors:
        return AdapterWrites(
            torch.zeros(0, 4, dtype=torch.long), torch.zeros(0), not_nodes=not_nodes
        )
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    mlp_io: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    site_outputs: dict[int, torch.Tensor] = {}
    handles = []

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
    try:
        for f in node_factors:
            if f.module not in ATTENTION_PATTERN:
                module = _module_of(hf_model, f.layer, f.module)
                handles.append(module.register_forward_hook(keep_input((f.layer, f.module))))
        for layer in mlp_layers:
            handles.append(_mlp_of(hf_model, layer).register_forward_hook(keep_mlp(layer)))
            if mlp_output_site is not None:
                handles.append(record_input_at(mlp_output_site(layer), layer, site_outputs))
        device = next(hf_model.parameters()).device
        hf_model(input_ids.reshape(1, -1).to(device))
    finally:
        for handle in handles:
            handle.remove()
    for layer in mlp_layers:
        _check_replaced_output(layer, mlp_io[layer][1][0].float(), site_outputs.get(layer))

    acts_by_layer: dict[int, list[torch.Tensor]] = {}
    writes_by_layer: dict[int, list[torch.Tensor]] = {}
    codes_by_layer: dict[int, list[tuple[int, int]]] = {}
    attention = []
    patterns = _pattern_writes(hf_model, input_ids, factors, zero_positions)
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
    hf_model: torch.nn.Module, input_ids: torch.Tensor, factors: list[LoraFactor], zero: int
) -> list[PatternWrite]:
    """The attention-pattern nodes of one prompt: for each q_proj or k_proj factor, its
    layer's attention pattern with and without the update (the model's own eager
    attention, so masks, rotary embeddings, softcapping and norms are its own)."""
    chosen = [f for f in factors if f.module in ATTENTION_PATTERN]
    if not chosen:
        return []
    by_key = {(f.layer, f.module): f for f in factors}
    ids = input_ids.reshape(1, -1).to(next(hf_model.parameters()).device)
    value_inputs: dict[int, torch.Tensor] = {}
    # each pattern layer's attention call (its arguments and weights), to call it again with
    # one update taken out: its input does not depend on it, so nothing else needs running
    calls: dict[int, tuple[tuple, dict, torch.Tensor | None]] = {}

    def keep_call(layer: int):
        def hook(_module, args, kwargs, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            calls[layer] = (args, kwargs, weights)

        return hook

    handles = []
    try:
        for layer in sorted({f.layer for f in chosen}):
            handles.append(
                _attention_of(hf_model, layer).register_forward_hook(
                    keep_call(layer), with_kwargs=True
                )
            )
            handles.append(
                _module_of(hf_model, layer, "v_proj").register_forward_hook(
                    lambda _m, args, _o, layer=layer: value_inputs.__setitem__(layer, args[0])
                )
            )
        hf_model(ids, use_cache=False)  # no cache: the calls again must not extend one
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for f in chosen:
        args, kwargs, adapted = calls[f.layer]
        if adapted is None:
            raise UnsupportedAdapterError(
                "q_proj/k_proj nodes need the attention weights (eager attention)"
            )
        with _update_removed(hf_model, f):
            without = _attention_of(hf_model, f.layer)(*args, **kwargs)[1]
        v_proj = _module_of(hf_model, f.layer, "v_proj")
        o_proj = _module_of(hf_model, f.layer, "o_proj")
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
    from em_circuits.models.adapter_scope import spec_outside_changes
    from em_circuits.models.hooks import (
        UnsupportedInterventionError,
        hook_sites,
        transcoder_set,
    )

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
            if site != (_mlp_of(model.hf_model, layer), "output")
        ]
        if elsewhere:  # Gemma-2's transcoders write after the post-feedforward norm
            unplaced = (
                f"the transcoders replace another value than the MLP output (layer "
                f"{elsewhere[0]}: after a norm), so the adapter's MLP writes are not nodes"
            )
            if not any(f.module in ATTENTION_LINEAR + ATTENTION_PATTERN for f in factors):
                return unplaced
            sites = {}
        kept = [f for f in factors if not (unplaced and f.module in mlp_modules)]
        writes = adapter_writes(
            model.hf_model,
            input_ids,
            kept,
            mlp_output_site=sites.__getitem__ if sites else None,
            zero_positions=_zero_positions(model),
        )
        if unplaced:
            left_out = [f for f in factors if f.module in mlp_modules]
            writes.not_nodes += _modules_at_layers(left_out)
    except (UnsupportedAdapterError, UnsupportedInterventionError) as err:
        return str(err)  # also a cross-layer set: its output sites are not one MLP's
    writes.not_nodes += spec_outside_changes(model.spec)
    if not writes.n_nodes:
        adapted = ", ".join(writes.not_nodes) or "none"
        return (
            f"no adapted module writes nodes (adapted: {adapted}; nodes: {', '.join(NODE_MODULES)})"
        )
    return writes


def _zero_positions(model: Any) -> int:
    zero = getattr(model.replacement, "zero_positions", slice(0, 1))
    return int(zero.stop) if isinstance(zero, slice) and zero.stop is not None else 1

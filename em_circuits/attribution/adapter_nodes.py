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

from dataclasses import dataclass, field
from typing import Any

import torch

from em_circuits.attribution.lora_factors import LoraFactor

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


def _zeroed_before(t: torch.Tensor, positions: int) -> torch.Tensor:
    """``t`` (..., n_pos, d) with the first ``positions`` positions zeroed, out of place (the
    positions that have no nodes: circuit-tracer has no feature or error node there)."""
    keep = torch.ones(t.shape[-2], 1, dtype=t.dtype, device=t.device)
    keep[:positions] = 0
    return t * keep


@dataclass
class AttentionWrite:
    """One attention module's update as nodes. In the attribution forward pass the update is
    taken out of the module's output and added back detached
    (:func:`~em_circuits.attribution.adapter_tape.taped_adapter`), so each node ``a_j B_j``
    is scored with the gradient at that output."""

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


def split_candidates(
    features: torch.Tensor, total_row: torch.Tensor, first_layer: int, k: int
) -> torch.Tensor:
    """Indices of the ``k`` active features at layer >= ``first_layer`` (the lowest layer an
    adapter node writes at) with the largest absolute total effect ``total_row``."""
    eligible = torch.nonzero(features[:, 0] >= first_layer).flatten()
    if k <= 0 or eligible.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    strength = total_row[eligible].abs()
    order = torch.argsort(strength, descending=True, stable=True)[:k]
    return eligible[order].sort().values


def read_candidates(writes: AdapterWrites, total_row: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` linear adapter nodes with the largest absolute total effect
    ``total_row`` (a nonlinear node's activation is no read), sorted."""
    strength = total_row.abs().cpu().clone()
    strength[~writes.linear()] = -1
    order = torch.argsort(strength, descending=True, stable=True)
    return order[strength[order] >= 0][:k].sort().values

"""An adapter's nodes in the torch engine: the same quantities as the nnsight path's.

:mod:`~em_circuits.attribution.adapter_nodes` defines the nodes and
:class:`~em_circuits.attribution.totals.TotalsBackward` computes their effects through
circuit-tracer's context, with the updates detached in the forward pass
(:func:`~em_circuits.attribution.adapter_tape.taped_adapter`). Here the backward is carried
by hand (:func:`~em_circuits.attribution.engine.carry`), so detaching an update is taking
its share out of the gradient: in the direct rows the gradient into an attention module's
input follows the base weight (the merged weight less ``s B A``) wherever the update has
nodes, and the pattern nodes' value ``dP V_base W_O,base`` is taken out of the gradient into
the values. Scores are the gradient at each write's site dotted with the write, as there:

* MLP-output nodes at the MLP's output (carved out of the error node at their position);
* ``o_proj`` nodes and pattern nodes at the attention output, ``v_proj`` nodes at the values.

The extra passes use seeds part-way down (:class:`~em_circuits.attribution.engine.Seeds`):
a feature's encoder at its read site for the adapter nodes' edges into it, an adapter node's
``s A_j`` at its module's input for its reads (through the MLP's nonlinearity at the operating
point for ``down_proj``, as autograd gives it there).
"""

from __future__ import annotations

from typing import Any

import torch

from em_circuits.attribution.adapter_nodes import (
    AdapterWrites,
    AttentionWrite,
    PatternWrite,
    read_candidates,
    split_candidates,
)
from em_circuits.attribution.engine import (
    Seeds,
    carry,
    exact_from_rows,
    pattern_transpose,
    seeded_rows,
    source_rows,
)
from em_circuits.attribution.engine_model import FrozenBatch, LinearisedModel
from em_circuits.attribution.exact import ExactEffects


def _position_mask(n_pos: int, zero_positions: int, device: torch.device) -> torch.Tensor:
    """(n_pos, 1): 0 at the positions without nodes, where updates are not detached."""
    keep = torch.ones(n_pos, 1, device=device)
    keep[:zero_positions] = 0
    return keep


class AdapterPass:
    """One prompt's adapter nodes during one backward pass of ``rows`` rows: their scores
    as the pass reaches their sites, and the detached updates' share of the gradient."""

    def __init__(self, writes: AdapterWrites, engine: LinearisedModel) -> None:
        self.writes = writes
        self.engine = engine
        self.mlp: dict[int, torch.Tensor] = {}
        self.attention: dict[int, torch.Tensor] = {}
        self.patterns: dict[int, torch.Tensor] = {}
        self.by_layer: dict[tuple[int, str], list[tuple[int, AttentionWrite]]] = {}
        for index, write in enumerate(writes.attention):
            key = (write.factor.layer, write.factor.module)
            self.by_layer.setdefault(key, []).append((index, write))
        self.pattern_layers: dict[int, list[tuple[int, PatternWrite]]] = {}
        for index, pattern in enumerate(writes.patterns):
            self.pattern_layers.setdefault(pattern.factor.layer, []).append((index, pattern))

    def score_mlp(self, layer: int, g_out: torch.Tensor) -> None:
        """MLP-output nodes: the gradient at the MLP's output (rows, pos, d) dotted with each
        write (as circuit-tracer scores an error node with its vector)."""
        if layer in self.writes.writes:
            writes = self.writes.writes[layer].to(g_out.device, torch.float32)
            scores = torch.einsum("bpd,pmd->pmb", g_out, writes)
            self.mlp[layer] = scores.reshape(-1, scores.shape[-1])

    def score_output(self, layer: int, g_att: torch.Tensor) -> None:
        """``o_proj`` nodes and pattern nodes, at the attention output."""
        for index, write in self.by_layer.get((layer, "o_proj"), []):
            self.attention[index] = write.scores(g_att)
        for index, pattern in self.pattern_layers.get(layer, []):
            self.patterns[index] = pattern.scores(g_att)

    def score_values(self, layer: int, gv: torch.Tensor) -> None:
        """``v_proj`` nodes, at the values."""
        for index, write in self.by_layer.get((layer, "v_proj"), []):
            self.attention[index] = write.scores(gv)

    def _update_grad(
        self, layer: int, module: str, grad: torch.Tensor, detached: torch.Tensor | None
    ) -> torch.Tensor | float:
        """The share of the gradient into ``module``'s input that goes through its update,
        in the detached rows where the update has nodes: ``s ((g B) A)``."""
        found = self.by_layer.get((layer, module), [])
        if not found or detached is None:
            return 0.0
        out: torch.Tensor | float = 0.0
        for _index, write in found:
            mask = _position_mask(grad.shape[1], write.zero_positions, grad.device)
            g = grad * mask * detached
            factor = write.factor
            out = out + factor.scale * (
                (g @ factor.B.to(g.device).float()) @ factor.A.to(g.device).float()
            )
        return out

    def output_update_grad(
        self, layer: int, g_att: torch.Tensor, detached: torch.Tensor | None
    ) -> torch.Tensor | float:
        return self._update_grad(layer, "o_proj", g_att, detached)

    def value_update_grad(
        self, layer: int, gv: torch.Tensor, detached: torch.Tensor | None
    ) -> torch.Tensor | float:
        return self._update_grad(layer, "v_proj", gv, detached)

    def pattern_grad(
        self, layer: int, g_att: torch.Tensor, detached: torch.Tensor | None
    ) -> torch.Tensor | float:
        """In the detached rows, the gradient into the values' input through each pattern
        node's value ``dP (x W_V,base^T) W_O,base^T`` (taken out: the node is detached)."""
        found = self.pattern_layers.get(layer, [])
        if not found or detached is None:
            return 0.0
        engine = self.engine
        out: torch.Tensor | float = 0.0
        for _index, pattern in found:
            mask = _position_mask(g_att.shape[1], pattern.zero_positions, g_att.device)
            g = (g_att * mask * detached)[None]
            gz = g @ pattern.o_weight.to(g.device).float()
            change = pattern.pattern_change.to(g.device).float()[None]
            gv = pattern_transpose(gz, change, engine.n_heads, engine.n_kv_heads, engine.head_dim)
            out = out + (gv @ pattern.v_weight.to(g.device).float())[0]
        return out

    def rows(self, n_rows: int) -> torch.Tensor:
        """``(n_rows, n_adapter_nodes)`` in the nodes' order (the MLP-output nodes by layer,
        then the attention nodes, then the pattern nodes); zero where the pass never reached."""
        parts = []
        for layer in sorted(self.writes.writes):
            n = self.writes.writes[layer].shape[0] * self.writes.writes[layer].shape[1]
            found = self.mlp.get(layer)
            parts.append(found.float().cpu() if found is not None else torch.zeros(n, n_rows))
        for index, write in enumerate(self.writes.attention):
            found = self.attention.get(index)
            n = write.activations.numel()
            parts.append(found.float().cpu() if found is not None else torch.zeros(n, n_rows))
        for index, pattern in enumerate(self.writes.patterns):
            found = self.patterns.get(index)
            n = len(pattern.values)
            parts.append(found.float().cpu() if found is not None else torch.zeros(n, n_rows))
        return torch.cat(parts).T if parts else torch.zeros(n_rows, 0)

    def carve_errors(self, errors: torch.Tensor, n_pos: int) -> None:
        """Take the MLP-output nodes' scores out of the error nodes at their layer and
        position (``errors``: rows, layers, pos; in place): the error keeps the rest."""
        for layer, scores in self.mlp.items():
            per_position = scores.reshape(n_pos, -1, scores.shape[-1]).sum(1)  # (pos, rows)
            errors[:, layer, :n_pos] -= per_position.T.to(errors)


def adapter_effects(
    engine: LinearisedModel,
    batch: FrozenBatch,
    directions: torch.Tensor,
    writes: AdapterWrites,
    budget: int,
    split_target: int | None,
    split_features: int,
    read_nodes: int,
) -> ExactEffects:
    """One prompt's exact effects with its adapter nodes, and their edges into the
    ``split_features`` features with the largest total effects on ``split_target`` and the
    reads of the ``read_nodes`` strongest linear nodes (as
    :func:`~em_circuits.attribution.totals.exact_effects` computes them)."""
    (prompt,) = batch.prompts
    t = directions.shape[0]
    n_pos, n_layers = prompt.n_pos, len(engine.layers)
    main = AdapterPass(writes, engine)
    g = seeded_rows(batch, [directions], int(engine.embed_weight.shape[1]))
    carried = carry(engine, batch, g, budget=budget, passing=slice(t, 2 * t), adapter=main)
    assert carried.errors is not None
    main.carve_errors(carried.errors[0], n_pos)
    rows = source_rows(engine, prompt, carried)
    effects = exact_from_rows(prompt, rows[:t], rows[t:], n_layers)
    effects.bos_mlp = carried.bos_rows(0, t)
    adapter_rows = main.rows(2 * t)
    effects.adapter_direct, effects.adapter_total = adapter_rows[:t], adapter_rows[t:]
    if split_target is None:
        return effects
    edge_features = torch.zeros(0, 3, dtype=torch.long)
    if split_features > 0:
        n_features = int(effects.features.shape[0])
        index = split_candidates(
            effects.features,
            effects.total[split_target, :n_features],
            int(writes.nodes[:, 0].min()),
            split_features,
        )
        effects.adapter_edge_features = index
        edge_features = effects.features[index]
    read = torch.zeros(0, dtype=torch.long)
    if read_nodes > 0:
        read = read_candidates(writes, effects.adapter_total[split_target], read_nodes)
        effects.adapter_read_nodes = read
    edges, reads = _edges_and_reads(
        engine, batch, writes, edge_features, writes.nodes[read], budget
    )
    if split_features > 0:
        effects.adapter_edges = edges
    if read_nodes > 0:
        effects.adapter_reads = reads
    return effects


def _edges_and_reads(
    engine: LinearisedModel,
    batch: FrozenBatch,
    writes: AdapterWrites,
    features: torch.Tensor,
    nodes: torch.Tensor,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One backward pass for both extra quantities, its rows the edges' then the reads':

    * ``(k, n_adapter_nodes)``: each adapter node's direct effect on the pre-activation of each
      of ``features`` (k, 3: layer, position, feature id), seeded at their encoders;
    * ``(m, n_sources + n_adapter_nodes)``: each listed linear adapter node's activation
      differentiated the direct way with respect to every feature, error and token node and
      every adapter node (their edges into it), seeded at the node's module input.

    Every update is detached (no total rows); only the reads' rows score the graph's nodes."""
    (prompt,) = batch.prompts
    k, m = features.shape[0], nodes.shape[0]
    n_features = sum(int(lf.positions.shape[0]) for lf in prompt.layer_features)
    n_sources = n_features + (len(engine.layers) + 1) * prompt.n_pos
    if k + m == 0:
        return torch.zeros(0, writes.n_nodes), torch.zeros(0, n_sources + writes.n_nodes)
    seeds = Seeds()
    _seed_edges(seeds, engine, features)
    _seed_reads(seeds, engine, prompt, writes, nodes, k)
    adapter = AdapterPass(writes, engine)
    g = _empty_pass(engine, batch, k + m)
    scored = slice(k, k + m) if m else None
    carried = carry(engine, batch, g, budget=budget, adapter=adapter, seeds=seeds, scored=scored)
    nodes_rows = adapter.rows(k + m)
    reads = torch.zeros(0, n_sources + writes.n_nodes)
    if m:
        sources = source_rows(engine, prompt, carried)
        reads = torch.cat([sources.float().cpu(), nodes_rows[k:]], dim=1)
    return nodes_rows[:k], reads


def _empty_pass(engine: LinearisedModel, batch: FrozenBatch, n_rows: int) -> torch.Tensor:
    (prompt,) = batch.prompts
    d_model = int(engine.embed_weight.shape[1])
    return torch.zeros(1, n_rows, prompt.n_pos, d_model, device=engine.embed_weight.device)


def _seed_edges(seeds: Seeds, engine: LinearisedModel, features: torch.Tensor) -> None:
    """Rows ``[0, k)``: each feature's encoder at its layer's read site and position."""
    device = engine.embed_weight.device
    for layer in features[:, 0].unique().tolist():
        rows = torch.nonzero(features[:, 0] == layer).flatten()
        transcoder = engine.layers[layer].transcoder
        encoders = transcoder.W_enc[features[rows, 2].to(transcoder.W_enc.device)].float()
        seeds.put(layer, "read", rows.to(device), features[rows, 1].to(device), encoders)


def _seed_reads(
    seeds: Seeds,
    engine: LinearisedModel,
    prompt: Any,
    writes: AdapterWrites,
    nodes: torch.Tensor,
    first: int,
) -> None:
    """Rows ``[first, first + m)``: each node's ``s A_j`` at its module's input (through the
    MLP's nonlinearity for ``down_proj``)."""
    device = engine.embed_weight.device
    factors = {(f.layer, f.module): f for f in writes.factors}
    for row, (layer, code, component, position) in enumerate(nodes.tolist(), start=first):
        module = writes.modules[code]
        factor = factors[layer, module]
        read = factor.scale * factor.A[component].to(device).float()
        site = {"v_proj": "v_in", "o_proj": "z", "down_proj": "mlp_in"}[module]
        if module == "down_proj":
            read = _through_mlp(engine, prompt, layer, position, read)
        index = torch.tensor([row], device=device)
        seeds.put(layer, site, index, torch.tensor([position], device=device), read[None])


def _through_mlp(
    engine: LinearisedModel, prompt: Any, layer: int, position: int, read: torch.Tensor
) -> torch.Tensor:
    """The gradient at the MLP's input of ``read . h`` with ``h`` the down projection's
    input (the MLP's hidden activations) at ``position``: the nonlinearity at the operating
    point, as autograd differentiates it in the nnsight path."""
    mlp: Any = engine.layers[layer].mlp
    x = prompt.mlp_inputs[layer][position].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        hidden = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        (grad,) = torch.autograd.grad((hidden.float() * read).sum(), x)
    return grad.float()

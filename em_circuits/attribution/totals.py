"""Exact direct and total effects of every active feature on a few targets, in one backward.

circuit-tracer's ``attribute()`` builds feature-to-feature edges by visiting features in
backward batches (about 33 batches for 8,192 features at 1B scale), and the analysis then
solves for total effects over the features it visited. The analysis needs only each node's
direct and total effect on the targets, and both come exactly, for *every* active feature,
from one backward pass through circuit-tracer's linearised replacement model:

Each target direction is injected at the last position of the pre-logit residual, twice: in
a "direct" batch row and a "total" batch row. The backward runs layer by layer from the top.
At layer l, the gradient at the layer's feature-output location scores every feature writing
there (``s_f += grad . a_f W_dec[f]``), and every error node. In the total rows, once the
features whose encoder reads at layer l have been scored, their score ``s_f`` is their total
effect on the target scaled by their activation; the target's total derivative with respect
to the residual at layer l's feature-input location therefore gains ``(s_f / a_f) W_enc[f]``
at the feature's position (the activation is unit-slope where active: ReLU, JumpReLU, TopK),
which we add to the gradient there before the backward goes on below layer l. The direct rows
get no re-injection, so they hold circuit-tracer's direct effects (its adjacency's target
rows). A cross-layer transcoder feature writes only at its encoder's layer and above, all of
which the backward has passed when it reaches the encoder's layer, so its score is complete
there too.

The rows use circuit-tracer's node layout ``[active features | error nodes (layer-major) |
token nodes]`` and equal, to float rounding, the target rows of ``attribute(...,
max_feature_nodes=None)`` (direct) and of the activation-normalised linear solve over its
full adjacency (:func:`~em_circuits.attribution.storage.total_effects`).

With an adapter's nodes (:mod:`~em_circuits.attribution.adapter_nodes`), each MLP-output
adapter node is scored where it writes, with the same gradient as that layer's error nodes,
into rows of its own, and its score is taken out of the error node at its layer and position
(which by linearity then holds the remainder of the error vector). Each attention adapter
node is scored with the gradient at its module's output, where its update was detached in the
direct rows of the forward pass; in the total rows nothing is detached, so total effects pass
through those nodes as through features.

Which nodes carry the adapter nodes' effect: the through-nodes part of an adapter node's total
effect, ``total - direct``, is a sum over the first node on each path, ``sum_f A[f, n] *
s_f / a_f`` over features plus the same over the attention nodes it reaches, with ``A[f, n]``
the node's direct effect on ``f``'s pre-activation (an edge, as circuit-tracer's adjacency has
them between features) and ``s_f / a_f`` the target's total derivative with respect to ``f``.
The edges come from backward passes injected at the encoders of the features with the largest
total effects on one target (circuit-tracer's feature rows), scoring only the adapter nodes,
and from backward passes started at the strongest linear adapter nodes' activations (their
reads). Both use extra direct rows of the batch, so one backward pass serves many features.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Literal

import torch

from em_circuits.attribution.adapter_nodes import AdapterWrites, read_candidates, split_candidates
from em_circuits.attribution.adapter_tape import AdapterTape, taped_adapter
from em_circuits.attribution.exact import ExactEffects, check_unit_slope

#: Most batch rows added to the forward pass for the adapter nodes' edges and reads: with
#: them one backward pass computes that many features' or nodes' rows at once.
EXTRA_ROWS = 64


class TotalsBackward:
    """Runs the one backward over a circuit-tracer ``AttributionContext`` (after its forward
    pass cached residuals for ``2 * n_targets`` batch rows, and possibly more: the rows after
    them are direct rows for the adapter nodes' edges and reads)."""

    def __init__(self, ctx: Any, n_targets: int, adapter: AdapterWrites | None = None) -> None:
        self.ctx = ctx
        self.n_targets = n_targets
        self.mlp_writes = adapter.writes if adapter is not None else {}
        self.attention = adapter.attention if adapter is not None else []
        self.patterns = adapter.patterns if adapter is not None else []
        self.n_adapter_nodes = adapter.n_nodes if adapter is not None else 0
        #: the adapter's activations and the gradients at its detached attention updates
        self.tape = AdapterTape()
        #: layer -> (n_pos * nodes per position, rows) scores of its MLP-output adapter nodes
        self.adapter_scores: dict[int, torch.Tensor] = {}
        feature_layers, feature_pos, _ = ctx.activation_matrix.indices()
        values = ctx.activation_matrix.values()
        self.feature_layers = feature_layers
        self.feature_pos = feature_pos
        # 1 / a_f turns a score (scaled by the activation) into the derivative d target / d a_f.
        self.inverse_activation = torch.where(
            values != 0, 1.0 / torch.where(values != 0, values, 1.0), 0.0
        )
        # Each layer's features, found once here: a lookup inside the backward would wait for
        # the GPU at every layer.
        n_layers = int(ctx.activation_matrix.shape[0])
        counts = torch.bincount(feature_layers, minlength=n_layers + 1).tolist()
        order = torch.argsort(feature_layers, stable=True)
        self.layer_index = dict(enumerate(torch.split(order, counts)))
        #: per layer (n_zero, d_model), set after the forward pass (:func:`bos_mlp_writes`);
        #: the last backward's direct effect of each on every batch row (rows, n_layers)
        self.bos_writes: list[torch.Tensor] | None = None
        self.bos_rows: torch.Tensor | None = None

    def reinjection(self, layer: int, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` plus, in the total rows, sum_f (s_f / a_f) W_enc[f] at each feature's
        position, over the features whose encoder reads at ``layer``."""
        ctx = self.ctx
        index = self.layer_index[layer]
        if index.numel() == 0:
            return grad
        t = self.n_targets
        buffer = ctx._batch_buffer
        scores = buffer[index.to(buffer.device), t : 2 * t]  # (n_f, n_targets): total rows
        coefficient = scores.float() * self.inverse_activation[index].float()[:, None]
        encoders = ctx.encoder_vecs[index].float()  # (n_f, d_model)
        n_pos = grad.shape[1]
        added = torch.zeros(t, n_pos, grad.shape[2], device=grad.device, dtype=torch.float32)
        added.index_add_(
            1,
            self.feature_pos[index].to(grad.device),
            (coefficient.T[:, :, None] * encoders[None]).to(grad.device),
        )
        out = grad.clone()
        out[t : 2 * t] += added.to(out.dtype)
        return out

    @property
    def batch_rows(self) -> int:
        """The forward pass's batch rows."""
        return int(self.ctx._resid_activations[0].shape[0])

    @property
    def direct_rows(self) -> list[int]:
        """Batch rows where attention updates are detached: the direct rows and the extra."""
        t = self.n_targets
        return list(range(t)) + list(range(2 * t, self.batch_rows))

    def run(self, directions: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        """``(2 * n_targets, row_size)``: direct rows, then total rows."""
        ctx = self.ctx
        n_layers, n_pos, _ = ctx.activation_matrix.shape
        rows = self.batch_rows
        ctx._batch_buffer = torch.zeros(
            ctx._row_size, rows, dtype=directions.dtype, device=directions.device
        )
        top = ctx._resid_activations[n_layers]
        seeded_rows = 2 * self.n_targets
        batch_rows = torch.arange(seeded_rows, device=top.device)
        last = torch.full((seeded_rows,), n_pos - 1, device=top.device)
        inject = torch.cat([directions, directions])
        proxy = weakref.proxy(self)
        self.forget_scores()
        with top.backward(gradient=torch.zeros_like(top), retain_graph=retain_graph):
            for layer in reversed(range(n_layers + 1)):
                if layer != n_layers:
                    grad = ctx._feature_output_activations[layer + 1].grad.clone()
                    ctx.compute_feature_attributions(layer, grad)
                    ctx.compute_error_attributions(layer, grad)
                    if layer in self.mlp_writes:
                        proxy.score_adapter(layer, grad)
                    proxy.score_bos(layer, grad)
                    point = ctx._resid_activations[layer]
                    point.grad = proxy.reinjection(layer, point.grad)
                else:
                    point = ctx._resid_activations[layer]
                    seeded = point.grad.clone()
                    seeded.index_put_((batch_rows, last), inject.to(seeded.dtype))
                    point.grad = seeded
            ctx.compute_token_attributions(ctx._feature_output_activations[0].grad)
        buffer, ctx._batch_buffer = ctx._batch_buffer, None
        n_active = int(ctx.activation_matrix._nnz())
        for layer, scores in self.adapter_scores.items():
            # The error node keeps what the adapter nodes at its layer and position do not.
            per_position = scores.reshape(n_pos, -1, rows).sum(1)
            start = n_active + layer * n_pos
            buffer[start : start + n_pos] -= per_position.to(buffer.dtype)
        return buffer.T[:seeded_rows]

    def score_bos(self, layer: int, grad: torch.Tensor) -> None:
        """The gradient at the zero positions dotted with the layer's MLP write there."""
        if self.bos_writes is None:
            return
        if self.bos_rows is None:
            self.bos_rows = torch.zeros(grad.shape[0], len(self.bos_writes))
        writes = self.bos_writes[layer]
        at = grad[:, : writes.shape[0]].float()
        self.bos_rows[:, layer] = torch.einsum("bpd,pd->b", at, writes.to(at)).cpu()

    def forget_scores(self) -> None:
        """Before a backward pass: no adapter node is scored yet."""
        self.adapter_scores = {}
        self.bos_rows = None
        self.tape.grads.clear()

    def score_adapter(self, layer: int, grad: torch.Tensor) -> None:
        """Each MLP-output adapter node's score at ``layer``: the gradient at its position
        dotted with its write (as circuit-tracer scores an error node with the error vector)."""
        writes = self.mlp_writes[layer].to(grad.device, torch.float32)
        scores = torch.einsum("bpd,pmd->pmb", grad.float(), writes)
        self.adapter_scores[layer] = scores.reshape(-1, scores.shape[-1])

    def adapter_rows(self, rows: int) -> torch.Tensor:
        """``(rows, n_adapter_nodes)`` from the last backward pass, in the nodes' order (the
        MLP-output nodes by layer, then the attention nodes)."""
        parts = []
        for layer in sorted(self.mlp_writes):
            scores = self.adapter_scores.get(layer)
            n = self.mlp_writes[layer].shape[0] * self.mlp_writes[layer].shape[1]
            parts.append(scores.float().cpu() if scores is not None else torch.zeros(n, rows))
        for index, write in enumerate(self.attention):
            grad = self.tape.grads.get(("attention", index))  # none: not reached
            n = write.activations.numel()
            parts.append(write.scores(grad).cpu() if grad is not None else torch.zeros(n, rows))
        for index, pattern in enumerate(self.patterns):
            grad = self.tape.grads.get(("pattern", index))
            n = len(pattern.values)
            parts.append(pattern.scores(grad).cpu() if grad is not None else torch.zeros(n, rows))
        if not parts:
            return torch.zeros(rows, 0)
        return torch.cat(parts).T

    def adapter_edges(self, index: torch.Tensor) -> torch.Tensor:
        """``(len(index), n_adapter_nodes)``: each adapter node's direct effect on the
        pre-activation of the active features ``index``, from backward passes injected at
        their encoders (as circuit-tracer's feature rows), the direct way (no re-injection), in
        the direct rows of the batch (where attention updates are detached)."""
        ctx = self.ctx
        rows = self.batch_rows
        direct_rows = torch.tensor(self.direct_rows)
        out = []
        proxy = weakref.proxy(self)
        for chunk in index.split(len(direct_rows)):
            layers = self.feature_layers[chunk]
            positions = self.feature_pos[chunk]
            inject = ctx.encoder_vecs[chunk]
            used = direct_rows[: len(chunk)]
            batch = used.to(positions.device)
            last = int(layers.max())
            start = ctx._resid_activations[last]
            self.forget_scores()
            with start.backward(gradient=torch.zeros_like(start), retain_graph=True):
                for layer in reversed(range(last + 1)):
                    if layer != last and layer in self.mlp_writes:
                        grad = ctx._feature_output_activations[layer + 1].grad.clone()
                        proxy.score_adapter(layer, grad)
                    mask = layers == layer
                    if mask.any():
                        point = ctx._resid_activations[layer]
                        grad = point.grad.clone()
                        grad.index_put_(
                            (batch[mask].to(grad.device), positions[mask].to(grad.device)),
                            inject[mask].to(grad.device, grad.dtype),
                        )
                        point.grad = grad
            out.append(self.adapter_rows(rows)[used])
        return torch.cat(out) if out else torch.zeros(0, 0)

    def adapter_reads(self, nodes: torch.Tensor, modules: list[str]) -> torch.Tensor:
        """``(len(nodes), row_size + n_adapter_nodes)``: each listed adapter node's activation
        (rows of ``AdapterWrites.nodes``; linear modules only) differentiated the direct way
        with respect to every upstream feature, error and token node (in circuit-tracer's node
        layout) and every adapter node: their edges into it (as circuit-tracer's feature
        rows, from a backward pass per batch of direct rows)."""
        ctx = self.ctx
        rows = self.batch_rows
        direct_rows = torch.tensor(self.direct_rows)
        proxy = weakref.proxy(self)
        out = []
        for chunk in nodes.split(len(direct_rows)):
            used = direct_rows[: len(chunk)]
            picked = []
            for row, (layer, code, component, position) in zip(used.tolist(), chunk.tolist()):
                activations = self.tape.activations[layer, modules[code]]
                picked.append(activations[row, position, component])
            start = torch.stack(picked).sum()  # batch rows are independent copies
            top = int(chunk[:, 0].max())
            ctx._batch_buffer = torch.zeros(
                ctx._row_size, rows, dtype=ctx.decoder_vecs.dtype, device=ctx.decoder_vecs.device
            )
            self.forget_scores()
            with start.backward(retain_graph=True):
                for layer in reversed(range(top)):
                    grad = ctx._feature_output_activations[layer + 1].grad.clone()
                    ctx.compute_feature_attributions(layer, grad)
                    ctx.compute_error_attributions(layer, grad)
                    if layer in self.mlp_writes:
                        proxy.score_adapter(layer, grad)
                ctx.compute_token_attributions(ctx._feature_output_activations[0].grad)
            buffer, ctx._batch_buffer = ctx._batch_buffer, None
            from_nodes = self.adapter_rows(rows)[used]
            found = buffer.T[used.to(buffer.device)].float().cpu()
            out.append(torch.cat([found, from_nodes], dim=1))
        return torch.cat(out) if out else torch.zeros(0, ctx._row_size + self.n_adapter_nodes)


def bos_mlp_writes(replacement: Any, ctx: Any) -> list[torch.Tensor]:
    """Per layer ``(n_zero, d_model)`` float32: what the MLP writes at the zero positions
    (BOS) in the forward pass just run, less its skip connection (which the backward carries
    to the nodes below): no node carries it, as circuit-tracer zeroes features and errors
    there. Read before the transcoders may be offloaded."""
    zero = replacement.zero_positions
    out = []
    with torch.no_grad():
        for layer in range(int(ctx.activation_matrix.shape[0])):
            write = ctx._feature_output_activations[layer + 1][0, zero].detach().float()
            if replacement.skip_transcoder:
                x = ctx._resid_activations[layer][0:1, zero].detach()
                transcoders = getattr(replacement.transcoders, "_module", replacement.transcoders)
                write = write - transcoders.compute_skip(layer, x)[0].float()
            out.append(write)
    return out


def exact_effects(
    replacement: Any,
    input_ids: torch.Tensor,
    directions_for: Callable[[torch.Tensor], torch.Tensor],
    check_context: Callable[[Any], None] | None = None,
    offload: Literal["cpu", "disk"] | None = None,
    adapter: AdapterWrites | None = None,
    split_target: int | None = None,
    split_features: int = 0,
    read_nodes: int = 0,
) -> ExactEffects:
    """Direct and total effects of every active feature, error and token node on each target.

    ``directions_for(logits)`` gets the last position's logits of the attribution forward pass
    and returns the target directions ``(n_targets, d_model)`` in the residual basis (as
    circuit-tracer's logit vectors), so targets may depend on that same pass. ``check_context``
    sees circuit-tracer's context before anything else runs (e.g. a NaN check).
    ``adapter`` adds its adapter nodes. With ``split_target``, the adapter nodes' edges into
    the ``split_features`` features with the largest total effects on that target (at or above
    the lowest adapter layer) are computed too, and the edges into the ``read_nodes`` linear
    adapter nodes with the largest total effects on it from every upstream node.
    """
    from circuit_tracer.utils.disk_offload import offload_modules

    check_unit_slope(replacement.transcoders)
    ids = replacement.ensure_tokenized(input_ids)
    ctx = replacement.setup_attribution(ids)
    if check_context is not None:
        check_context(ctx)
    logits = ctx.logits[0, -1].detach().float()
    directions = directions_for(logits).to(ctx.decoder_vecs.dtype)
    if directions.ndim != 2 or directions.shape[0] == 0:
        raise ValueError(
            f"need a (n_targets, d_model) direction matrix, got {tuple(directions.shape)}"
        )
    t = directions.shape[0]
    nodes = adapter if adapter is not None and adapter.n_nodes else None
    split = nodes is not None and split_target is not None and split_features > 0
    read = nodes is not None and split_target is not None and read_nodes > 0
    backward = TotalsBackward(ctx, t, nodes)
    wanted = max(split_features if split else 0, read_nodes if read else 0)
    extra = min(max(wanted - t, 0), EXTRA_ROWS)
    handles: list = []
    try:
        if offload:
            handles += offload_modules(replacement.get_offload_targets_phase0(), offload)
        taping = (
            taped_adapter(replacement._model, nodes, backward.tape)
            if nodes is not None
            else nullcontext()
        )
        backward.tape.passing_rows = (t, 2 * t)  # totals pass through the nodes
        with taping:
            replacement.run_forward_pass(ids, 2 * t + extra, ctx)
        backward.bos_writes = bos_mlp_writes(replacement, ctx)
        if offload:
            handles += offload_modules(replacement.get_offload_targets_phase1(), offload)
            handles += offload_modules(replacement.get_offload_targets_phase2(), offload)
        rows = backward.run(directions, retain_graph=split or read)
        bos_rows = backward.bos_rows
        adapter_rows = backward.adapter_rows(backward.batch_rows)[: 2 * t].float()
        edge_features = edges = read_index = reads = None
        if split:
            assert nodes is not None and split_target is not None
            features = ctx.activation_matrix.indices().T.detach().long().cpu()
            edge_features = split_candidates(
                features,
                rows[t + split_target, : features.shape[0]].float().cpu(),
                int(nodes.nodes[:, 0].min()),
                split_features,
            )
            edges = backward.adapter_edges(edge_features.to(backward.feature_pos.device))
        if read:
            assert nodes is not None and split_target is not None
            read_index = read_candidates(nodes, adapter_rows[t + split_target], read_nodes)
            reads = backward.adapter_reads(nodes.nodes[read_index], nodes.modules)
    finally:
        for reload in handles:
            reload()
        # The tape's tensors belong to the autograd graph, whose gradient hooks refer back to
        # the tape: a cycle through C++ that Python's collector cannot see, holding the whole
        # forward pass in GPU memory unless broken here.
        backward.tape.clear()
    n_layers, n_pos, _ = ctx.activation_matrix.shape
    active = ctx.activation_matrix
    return ExactEffects(
        features=active.indices().T.detach().long().cpu(),
        activations=active.values().detach().float().cpu(),
        direct=rows[:t].float().cpu(),
        total=rows[t:].float().cpu(),
        logits=logits.cpu(),
        n_layers=int(n_layers),
        n_pos=int(n_pos),
        adapter_direct=adapter_rows[:t] if nodes is not None else None,
        adapter_total=adapter_rows[t:] if nodes is not None else None,
        adapter_edge_features=edge_features,
        adapter_edges=edges.float().cpu() if edges is not None else None,
        adapter_read_nodes=read_index,
        adapter_reads=reads,
        bos_mlp=bos_rows[:t].float() if bos_rows is not None else None,
    )

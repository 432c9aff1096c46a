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

With an adapter's writes (:mod:`~em_circuits.attribution.adapter_nodes`), each adapter node is
scored where it writes, with the same gradient as that layer's error nodes, into rows of its
own, and its score is taken out of the error node at its layer and position (which by
linearity then holds the remainder of the error vector).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from em_circuits.models.spec import ModelLoadError

#: Activation functions whose derivative is 1 wherever the feature is active.
UNIT_SLOPE_ACTIVATIONS = ("relu", "jumprelu", "topk", "relutopk")  # relutopk: sparsify's


class UnsupportedTranscoderError(ModelLoadError):
    """A transcoder whose activation function totals mode cannot differentiate exactly."""


@dataclass
class ExactEffects:
    """One prompt's exact effects on its targets, in circuit-tracer's node layout."""

    features: torch.Tensor  # (n_active, 3) int64: layer, position, transcoder feature id
    activations: torch.Tensor  # (n_active,) float32
    direct: torch.Tensor  # (n_targets, n_sources) float32
    total: torch.Tensor  # (n_targets, n_sources) float32
    logits: torch.Tensor  # (vocab,) float32, the last position of the same forward pass
    n_layers: int
    n_pos: int
    #: (n_targets, n_adapter_nodes) float32, in the order of the AdapterWrites' nodes
    adapter_direct: torch.Tensor | None = None
    adapter_total: torch.Tensor | None = None


def _activation_names(transcoders: Any) -> list[str]:
    module = getattr(transcoders, "_module", transcoders)  # an nnsight Envoy wraps the module
    if hasattr(module, "activation_function"):
        functions = [module.activation_function]  # one cross-layer transcoder
    else:
        functions = [tc.activation_function for tc in module.transcoders]
    names = []
    for fn in functions:
        name = getattr(fn, "__name__", None) or type(fn).__name__
        names.append(name.lower().replace("_", ""))
    return names


def check_unit_slope(transcoders: Any) -> None:
    """Refuse transcoders whose activation is not unit-slope where active (one line, names it)."""
    for name in _activation_names(transcoders):
        if name not in UNIT_SLOPE_ACTIVATIONS:
            raise UnsupportedTranscoderError(
                f"transcoder activation {name!r} is not unit-slope where active, so totals mode "
                f"cannot propagate exact total effects through it; use --graph-mode full "
                f"(supported in totals mode: {', '.join(UNIT_SLOPE_ACTIVATIONS)})"
            )


class _TotalsBackward:
    """Runs the one backward over a circuit-tracer ``AttributionContext`` (after its forward
    pass cached residuals for ``2 * n_targets`` batch rows)."""

    def __init__(
        self, ctx: Any, n_targets: int, adapter_writes: dict[int, torch.Tensor] | None = None
    ) -> None:
        self.ctx = ctx
        self.n_targets = n_targets
        self.adapter_writes = adapter_writes or {}
        #: layer -> (n_pos * nodes per position, rows) scores of its adapter nodes
        self.adapter_scores: dict[int, torch.Tensor] = {}
        feature_layers, feature_pos, _ = ctx.activation_matrix.indices()
        values = ctx.activation_matrix.values()
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

    def reinjection(self, layer: int, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` plus, in the total rows, sum_f (s_f / a_f) W_enc[f] at each feature's
        position, over the features whose encoder reads at ``layer``."""
        ctx = self.ctx
        index = self.layer_index[layer]
        if index.numel() == 0:
            return grad
        t = self.n_targets
        buffer = ctx._batch_buffer
        scores = buffer[index.to(buffer.device), t:]  # (n_f, n_targets)
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
        out[t:] += added.to(out.dtype)
        return out

    def run(self, directions: torch.Tensor) -> torch.Tensor:
        """``(2 * n_targets, row_size)``: direct rows, then total rows."""
        ctx = self.ctx
        n_layers, n_pos, _ = ctx.activation_matrix.shape
        rows = 2 * self.n_targets
        ctx._batch_buffer = torch.zeros(
            ctx._row_size, rows, dtype=directions.dtype, device=directions.device
        )
        top = ctx._resid_activations[n_layers]
        batch_rows = torch.arange(rows, device=top.device)
        last = torch.full((rows,), n_pos - 1, device=top.device)
        inject = torch.cat([directions, directions])
        proxy = weakref.proxy(self)
        with top.backward(gradient=torch.zeros_like(top), retain_graph=False):
            for layer in reversed(range(n_layers + 1)):
                if layer != n_layers:
                    grad = ctx._feature_output_activations[layer + 1].grad.clone()
                    ctx.compute_feature_attributions(layer, grad)
                    ctx.compute_error_attributions(layer, grad)
                    if layer in self.adapter_writes:
                        proxy.score_adapter(layer, grad)
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
        return buffer.T

    def score_adapter(self, layer: int, grad: torch.Tensor) -> None:
        """Each adapter node's score at ``layer``: the gradient at its position dotted with
        its write (as circuit-tracer scores an error node with the error vector)."""
        writes = self.adapter_writes[layer].to(grad.device, torch.float32)
        scores = torch.einsum("bpd,pmd->pmb", grad.float(), writes)
        self.adapter_scores[layer] = scores.reshape(-1, scores.shape[-1])

    def adapter_rows(self) -> torch.Tensor:
        """``(2 * n_targets, n_adapter_nodes)``, layers in ascending order."""
        if not self.adapter_scores:
            return torch.zeros(2 * self.n_targets, 0)
        return torch.cat([self.adapter_scores[k] for k in sorted(self.adapter_scores)]).T


def exact_effects(
    replacement: Any,
    input_ids: torch.Tensor,
    directions_for: Callable[[torch.Tensor], torch.Tensor],
    check_context: Callable[[Any], None] | None = None,
    offload: Literal["cpu", "disk"] | None = None,
    adapter_writes: dict[int, torch.Tensor] | None = None,
) -> ExactEffects:
    """Direct and total effects of every active feature, error and token node on each target.

    ``directions_for(logits)`` gets the last position's logits of the attribution forward pass
    and returns the target directions ``(n_targets, d_model)`` in the residual basis (as
    circuit-tracer's logit vectors), so targets may depend on that same pass. ``check_context``
    sees circuit-tracer's context before anything else runs (e.g. a NaN check).
    ``adapter_writes`` (``AdapterWrites.writes``) adds adapter nodes, carved out of the errors.
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
    handles: list = []
    try:
        if offload:
            handles += offload_modules(replacement.get_offload_targets_phase0(), offload)
        replacement.run_forward_pass(ids, 2 * directions.shape[0], ctx)
        if offload:
            handles += offload_modules(replacement.get_offload_targets_phase1(), offload)
            handles += offload_modules(replacement.get_offload_targets_phase2(), offload)
        backward = _TotalsBackward(ctx, directions.shape[0], adapter_writes)
        rows = backward.run(directions)
        adapter_rows = backward.adapter_rows().float().cpu()
    finally:
        for reload in handles:
            reload()
    n_layers, n_pos, _ = ctx.activation_matrix.shape
    t = directions.shape[0]
    active = ctx.activation_matrix
    return ExactEffects(
        features=active.indices().T.detach().long().cpu(),
        activations=active.values().detach().float().cpu(),
        direct=rows[:t].float().cpu(),
        total=rows[t:].float().cpu(),
        logits=logits.cpu(),
        n_layers=int(n_layers),
        n_pos=int(n_pos),
        adapter_direct=adapter_rows[:t] if adapter_writes else None,
        adapter_total=adapter_rows[t:] if adapter_writes else None,
    )

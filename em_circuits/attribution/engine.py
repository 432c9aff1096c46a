"""Exact direct and total effects in plain PyTorch: one forward pass, the transpose by hand.

The default engine of totals mode. It computes what :mod:`em_circuits.attribution.totals`
computes through circuit-tracer's nnsight context (the target rows of circuit-tracer's
adjacency, and the activation-normalised linear solve over it), without nnsight and
without running the model once per target row:

- one forward pass per batch of prompts (:func:`~em_circuits.attribution.engine_model.
  frozen_forward`) keeps each layer's attention patterns and norm scales, the active
  features and the error vectors;
- with those frozen, the replacement model is linear in the residual stream, so the
  gradient of every target row is carried down by hand: elementwise norm scales, the output
  and value projections' transposes and the patterns' transposes (grouped-query heads
  summed), the transcoder's skip connection where it has one. No autograd graph is kept,
  so the forward pass runs once however many rows the backward carries;
- at each layer's write site the gradient scores every active feature (``a_f (g . W_dec[f])``)
  and error node; in the "total" rows the features' scores are re-injected at their
  encoders before the gradient goes below the layer (as ``TotalsBackward.reinjection``);
- the embedding's gradient scores the token nodes.

Decoder and encoder rows are gathered a run of positions at a time (``feature_budget``
floats, 256 MiB by default), grouped by position so that each position's rows meet its
gradient in one batched matmul; memory stays bounded at 2,048 tokens.

An adapter's nodes, their edges and reads are carried the same way
(:mod:`~em_circuits.attribution.engine_adapter`). Cross-layer transcoders and architectures
outside :class:`~em_circuits.attribution.engine_model.LinearisedModel` use the nnsight path.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from em_circuits.attribution.adapter_nodes import AdapterWrites
from em_circuits.attribution.engine_features import feature_groups, feature_scores, reinject
from em_circuits.attribution.engine_model import (
    EngineUnsupportedError,
    FrozenBatch,
    LayerFeatures,
    LinearisedModel,
    PassRecording,
    frozen_forward,
)
from em_circuits.attribution.exact import ExactEffects, check_unit_slope
from em_circuits.attribution.targets import PRECISIONS
from em_circuits.models.load import LoadedModel, NonFiniteError

DirectionsFor = Callable[[torch.Tensor], torch.Tensor]

_LINEARISED: weakref.WeakKeyDictionary[Any, LinearisedModel] = weakref.WeakKeyDictionary()


def linearised(model: LoadedModel) -> LinearisedModel:
    """The engine's view of a loaded model (built once per replacement model)."""
    replacement = model.replacement
    if replacement not in _LINEARISED:
        check_unit_slope(replacement.transcoders)
        zero = getattr(replacement, "zero_positions", slice(0, 1))
        _LINEARISED[replacement] = LinearisedModel.of(model.hf_model, replacement.transcoders, zero)
    return _LINEARISED[replacement]


def unsupported_reason(model: LoadedModel) -> str | None:
    """Why the torch engine cannot attribute this model (then the nnsight path does)."""
    try:
        linearised(model)
    except EngineUnsupportedError as err:
        return str(err)
    return None


@contextmanager
def matmul_precision(precision: str):
    """TF32 tensor cores for the matmuls in fast mode; IEEE float32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def batched_effects(
    model: LoadedModel,
    sequences: Sequence[torch.Tensor],
    directions_for: Sequence[DirectionsFor],
    precision: str = "float32",
    feature_budget: int = 1 << 26,
    where: Sequence[str] | None = None,
) -> list[ExactEffects]:
    """Exact effects of every active feature, error and token node on each prompt's targets.

    ``directions_for[i](logits)`` gets prompt ``i``'s last-position logits of the forward
    pass and returns its target directions ``(n_targets, d_model)`` in the residual basis,
    as :func:`~em_circuits.attribution.totals.exact_effects` takes them.
    """
    engine = linearised(model)
    labels = list(where) if where is not None else [f"prompt {i}" for i in range(len(sequences))]
    with matmul_precision(precision), torch.no_grad():
        batch, directions = _forward(engine, sequences, directions_for, labels)
        return _backward(engine, batch, directions, feature_budget)


def effects_with_adapter(
    model: LoadedModel,
    ids: torch.Tensor,
    directions_for: DirectionsFor,
    adapter: Any,
    split_target: int | None = None,
    split_features: int = 0,
    read_nodes: int = 0,
    precision: str = "float32",
    feature_budget: int = 1 << 26,
    where: str = "prompt",
) -> tuple[ExactEffects, Any]:
    """:func:`batched_effects` of one prompt with an adapter's nodes, their edges and reads
    (:func:`~em_circuits.attribution.engine_adapter.adapter_effects`); returns the effects
    and the nodes.

    ``adapter`` is the nodes (:class:`~em_circuits.attribution.adapter_nodes.AdapterWrites`)
    or a recording that takes them from the graph's own frozen forward pass (a
    :class:`~em_circuits.attribution.engine_model.PassRecording`, e.g.
    :meth:`~em_circuits.attribution.prompt_adapter_nodes.AdapterPlan.recording`), instead of
    a pass of their own; a recording may find that the prompt has none (the nodes returned
    are then why, and the effects have no adapter rows)."""
    from em_circuits.attribution.engine_adapter import adapter_effects  # noqa: PLC0415  # cycle: engine_adapter imports this module

    recording = None if isinstance(adapter, AdapterWrites) else adapter
    engine = linearised(model)
    with matmul_precision(precision), torch.no_grad():
        batch, (directions,) = _forward(
            engine,
            [ids],
            [directions_for],
            [where],
            keep_mlp_inputs=read_nodes > 0,
            recording=recording,
        )
        writes = adapter if recording is None else batch.recorded
        if isinstance(writes, str):  # no nodes on this prompt: the plain graph
            (effects,) = _backward(engine, batch, [directions], feature_budget)
            return effects, writes
        effects = adapter_effects(
            engine,
            batch,
            directions,
            writes,
            feature_budget,
            split_target,
            split_features,
            read_nodes,
        )
        return effects, writes


def _forward(
    engine: LinearisedModel,
    sequences: Sequence[torch.Tensor],
    directions_for: Sequence[DirectionsFor],
    where: Sequence[str],
    keep_mlp_inputs: bool = False,
    recording: PassRecording | None = None,
) -> tuple[FrozenBatch, list[torch.Tensor]]:
    """The frozen forward pass of ``sequences``, each prompt checked finite, and each
    prompt's target directions chosen from its logits."""
    batch = frozen_forward(engine, sequences, keep_mlp_inputs=keep_mlp_inputs, recording=recording)
    directions = []
    for label, fn, prompt in zip(where, directions_for, batch.prompts):
        _check_finite(prompt.errors, prompt.layer_features, prompt.logits, label)
        d = fn(prompt.logits).float().to(engine.embed_weight.device)
        if d.ndim != 2 or d.shape[0] == 0:
            raise ValueError(f"need a (n_targets, d_model) direction matrix, got {tuple(d.shape)}")
        directions.append(d)
    return batch, directions


def _check_finite(
    errors: torch.Tensor, layers: list[LayerFeatures], logits: torch.Tensor, where: str
) -> None:
    """Name the first layer whose transcoder activations or errors are NaN/Inf."""
    values = torch.cat([lf.activations for lf in layers])
    if bool(torch.isfinite(values).all() & torch.isfinite(errors).all()):
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteError(f"{where}: NaN/Inf in the model's logits (after the last layer)")
        return
    for layer, (lf, error) in enumerate(zip(layers, errors)):
        if not (torch.isfinite(lf.activations).all() and torch.isfinite(error).all()):
            raise NonFiniteError(
                f"{where}: NaN/Inf in the MLP input or output at layer {layer} "
                "(transcoder activations or errors)"
            )


def seeded_rows(batch: FrozenBatch, directions: list[torch.Tensor], d_model: int) -> torch.Tensor:
    """``(batch, 2 t, pos, d)``: each prompt's directions at its last position, in its direct
    rows ``[0, t)`` and its total rows ``[t, 2t)`` (t: the batch's most targets)."""
    t = max(d.shape[0] for d in directions)
    g = torch.zeros(len(directions), 2 * t, batch.n_pos, d_model, device=directions[0].device)
    for row, (prompt, d) in enumerate(zip(batch.prompts, directions)):
        g[row, : d.shape[0], prompt.n_pos - 1] = d
        g[row, t : t + d.shape[0], prompt.n_pos - 1] = d
    return g


#: Where a seed enters the backward part-way down, at its layer: the transcoder's read site
#: ("read"), the MLP's input ("mlp_in"), the output projection's input ("z"), the value
#: projection's input ("v_in").
SeedSite = str


@dataclass
class Seeds:
    """Gradients injected part-way down one prompt's backward (batch row 0): by (layer, site),
    the rows, positions and vectors added there (an adapter node's edges and reads)."""

    at: dict[tuple[int, SeedSite], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )

    def put(
        self,
        layer: int,
        site: SeedSite,
        rows: torch.Tensor,
        positions: torch.Tensor,
        vectors: torch.Tensor,
    ) -> None:
        """Seed ``vectors`` at (layer, site) in these rows and positions, beside any seeded
        there already."""
        if (layer, site) in self.at:
            old_rows, old_positions, old_vectors = self.at[layer, site]
            rows = torch.cat([old_rows, rows])
            positions = torch.cat([old_positions, positions])
            vectors = torch.cat([old_vectors, vectors])
        self.at[layer, site] = (rows, positions, vectors)

    def add(self, grad: torch.Tensor, layer: int, site: SeedSite) -> None:
        """Add the seeds at (layer, site) to ``grad`` (rows, pos, d) in place."""
        if (layer, site) in self.at:
            rows, positions, vectors = self.at[layer, site]
            grad.index_put_((rows, positions), vectors.to(grad), accumulate=True)


@dataclass
class Carried:
    """What a backward carried down: each prompt's feature scores by layer, the error
    scores (batch, rows, layer, pos) and the gradient at the embedding (batch, rows, pos, d)."""

    features: list[list[torch.Tensor]]
    errors: torch.Tensor | None
    embedding: torch.Tensor
    #: (batch, rows, layer): the direct effect of each layer's MLP write at BOS (no node's)
    bos_mlp: torch.Tensor | None = None

    def bos_rows(self, row: int, n: int) -> torch.Tensor | None:
        """``(n, n_layers)``: prompt ``row``'s first ``n`` rows of :attr:`bos_mlp`."""
        return None if self.bos_mlp is None else self.bos_mlp[row, :n].float().cpu()


def _backward(
    engine: LinearisedModel, batch: FrozenBatch, directions: list[torch.Tensor], budget: int
) -> list[ExactEffects]:
    t = max(d.shape[0] for d in directions)
    g = seeded_rows(batch, directions, int(engine.embed_weight.shape[1]))
    carried = carry(engine, batch, g, budget=budget, passing=slice(t, 2 * t))
    out = []
    for row, (prompt, d) in enumerate(zip(batch.prompts, directions)):
        rows = source_rows(engine, prompt, carried, row)
        k = d.shape[0]
        out.append(exact_from_rows(prompt, rows[:k], rows[t : t + k], len(engine.layers)))
        out[-1].bos_mlp = carried.bos_rows(row, k)
    return out


def source_rows(
    engine: LinearisedModel, prompt: Any, carried: Carried, row: int = 0
) -> torch.Tensor:
    """``(rows, n_sources)`` of one prompt in circuit-tracer's node layout: its active features
    (layer by layer), its error nodes (layer-major), its tokens."""
    n, n_layers = prompt.n_pos, len(engine.layers)
    embedding = carried.embedding[row, :, :n]
    tokens = engine.embed_weight[prompt.ids].float()
    assert carried.errors is not None
    errors = carried.errors[row, :, :, :n].reshape(embedding.shape[0], n_layers * n)
    token_scores = torch.einsum("rpd,pd->rp", embedding, tokens)
    return torch.cat([*carried.features[row], errors, token_scores], dim=1)


def carry(
    engine: LinearisedModel,
    batch: FrozenBatch,
    g: torch.Tensor,
    *,
    budget: int,
    passing: slice | None = None,
    adapter: Any = None,
    seeds: Seeds | None = None,
    scored: slice | None = slice(None),
) -> Carried:
    """Carry ``g`` (batch, rows, pos, d), the gradient at the last norm's output (the targets'
    directions), down the linearised model, scoring every feature and error node in the
    ``scored`` rows (None: none; the carried embedding gradient keeps those rows only).
    In the ``passing`` rows (total effects) each layer's feature scores are re-injected at
    their encoders and an adapter's attention updates pass gradients; the other rows are
    direct. ``adapter`` (an :class:`~em_circuits.attribution.engine_adapter.AdapterPass`)
    and ``seeds`` serve one prompt (batch row 0)."""
    d_model = int(engine.embed_weight.shape[1])
    n_layers = len(engine.layers)
    n_prompts, rows, n_pos, _ = g.shape
    if passing is not None and scored != slice(None):
        raise ValueError("a pass with total rows scores every row")
    n_scored = len(range(rows)[scored]) if scored is not None else 0
    scale = batch.scales
    g = g * norm_factor(engine, scale, engine.final_norm)
    features: list[list[torch.Tensor]] = [[] for _ in batch.prompts]
    errors = bos = None
    if scored is not None:
        errors = torch.zeros(n_prompts, n_scored, n_layers, n_pos, device=g.device)
        bos = torch.zeros(n_prompts, n_scored, n_layers, device=g.device)
    for layer in reversed(range(n_layers)):
        parts = engine.layers[layer]
        g_out = g
        if engine.write_kind == "mlp" and parts.mlp_out_norm is not None:
            g_out = g * norm_factor(engine, scale, parts.mlp_out_norm)
        if adapter is not None:
            adapter.score_mlp(layer, g_out[0])
        if errors is not None:
            stacked = _padded([p.errors[layer] for p in batch.prompts], n_pos)
            errors[:, :, layer] = torch.einsum("brpd,bpd->brp", g_out[:, scored], stacked)
            for row, prompt in enumerate(batch.prompts):
                if prompt.bos_mlp is not None and bos is not None:
                    at_bos = g_out[row, scored, engine.zero_positions]
                    bos[row, :, layer] = torch.einsum("rpd,pd->r", at_bos, prompt.bos_mlp[layer])
        g_in = torch.zeros_like(g)
        if parts.transcoder.W_skip is not None:
            g_in += g_out @ parts.transcoder.W_skip.float()
        if scored is not None:
            for row, prompt in enumerate(batch.prompts):
                found = prompt.layer_features[layer]
                groups = feature_groups(found, n_pos, d_model, budget)
                scores = feature_scores(engine, layer, g_out[row, scored], found, groups)
                features[row].insert(0, scores)
                if passing is not None:
                    reinject(g_in[row, passing], scores[passing], found, parts.transcoder, groups)
        if seeds is not None:
            seeds.add(g_in[0], layer, "read")
        g = g + _to_residual(engine, parts, g_in, scale)
        if seeds is not None and (layer, "mlp_in") in seeds.at:
            mlp_in = torch.zeros_like(g)
            seeds.add(mlp_in[0], layer, "mlp_in")
            g = g + mlp_in * norm_factor(engine, scale, parts.mlp_norm)
        g = g + _attention_transpose(
            engine, parts, g, batch.patterns[layer], scale, layer, passing, adapter, seeds
        )
    embedding = g[:, scored] if scored is not None else g
    embedding = embedding * engine.embed_factor(engine.embed_weight.dtype)
    return Carried(features, errors, embedding, bos)


def exact_from_rows(
    prompt: Any, direct: torch.Tensor, total: torch.Tensor, n_layers: int
) -> ExactEffects:
    features = [
        torch.stack([torch.full_like(lf.positions, layer), lf.positions, lf.features], dim=1)
        for layer, lf in enumerate(prompt.layer_features)
    ]
    return ExactEffects(
        features=torch.cat(features).long().cpu(),
        activations=torch.cat([lf.activations for lf in prompt.layer_features]).float().cpu(),
        direct=direct.float().cpu(),
        total=total.float().cpu(),
        logits=prompt.logits.cpu(),
        n_layers=n_layers,
        n_pos=prompt.n_pos,
    )


def norm_factor(
    engine: LinearisedModel, scale: dict[int, torch.Tensor], norm: torch.nn.Module
) -> torch.Tensor:
    """``(batch, 1, pos, d)``: what a norm multiplies its input by, its scale frozen (the
    transpose of a frozen RMSNorm is the same elementwise product)."""
    return scale[id(norm)][:, None] * engine.norm_weight(norm)


def _padded(tensors: list[torch.Tensor], n_pos: int) -> torch.Tensor:
    out = torch.zeros(len(tensors), n_pos, tensors[0].shape[-1], device=tensors[0].device)
    for row, tensor in enumerate(tensors):
        out[row, : tensor.shape[0]] = tensor
    return out


def _to_residual(
    engine: LinearisedModel, parts: Any, g_in: torch.Tensor, scale: dict[int, torch.Tensor]
) -> torch.Tensor:
    """The read site's gradient carried to the residual stream before the MLP's norm."""
    if engine.read_kind == "residual":
        return g_in
    if engine.read_kind == "normed":
        return g_in * norm_factor(engine, scale, parts.mlp_norm)
    return g_in * scale[id(parts.mlp_norm)][:, None]  # normalised: before the norm's weight


def _attention_transpose(
    engine: LinearisedModel,
    parts: Any,
    g: torch.Tensor,
    patterns: torch.Tensor,
    scale: dict[int, torch.Tensor],
    layer: int,
    passing: slice | None = None,
    adapter: Any = None,
    seeds: Seeds | None = None,
) -> torch.Tensor:
    """The gradient the attention block adds to its input residual, patterns frozen; an
    adapter's attention updates detached outside the ``passing`` rows."""
    n_prompts, rows, n_pos, _ = g.shape
    if parts.attention_out_norm is not None:
        g = g * norm_factor(engine, scale, parts.attention_out_norm)
    detached = None
    if adapter is not None:
        detached = torch.ones(rows, 1, 1, device=g.device)
        if passing is not None:
            detached[passing] = 0
        adapter.score_output(layer, g[0])
    h, kv, dh = engine.n_heads, engine.n_kv_heads, engine.head_dim
    gz = g @ parts.o_proj.weight.float()  # (b, r, p, h * dh)
    if adapter is not None:
        gz[0] -= adapter.output_update_grad(layer, g[0], detached)
    if seeds is not None:
        seeds.add(gz[0], layer, "z")
    gv = pattern_transpose(gz, patterns, h, kv, dh)
    if adapter is not None:
        adapter.score_values(layer, gv[0])
    g_normed = gv @ parts.v_proj.weight.float()
    if adapter is not None:
        g_normed[0] -= adapter.value_update_grad(layer, gv[0], detached)
        g_normed[0] -= adapter.pattern_grad(layer, g[0], detached)
    if seeds is not None:
        seeds.add(g_normed[0], layer, "v_in")
    return g_normed * norm_factor(engine, scale, parts.input_norm)


def pattern_transpose(
    gz: torch.Tensor, patterns: torch.Tensor, h: int, kv: int, dh: int
) -> torch.Tensor:
    """The gradient at the values from the one at the heads' outputs ``gz`` (b, r, p, h * dh):
    each head's pattern transposed, grouped-query heads summed onto their value head."""
    n_prompts, rows, n_pos, _ = gz.shape
    gz = gz.reshape(n_prompts, rows, n_pos, h, dh).permute(0, 3, 2, 1, 4)
    gz = gz.reshape(n_prompts, h, n_pos, rows * dh)
    gv = patterns.transpose(-1, -2) @ gz  # (b, h, keys, r * dh)
    gv = gv.reshape(n_prompts, kv, h // kv, n_pos, rows, dh).sum(2)
    return gv.permute(0, 3, 2, 1, 4).reshape(n_prompts, rows, n_pos, kv * dh)

"""The frozen forward pass of the plain-PyTorch attribution engine, and the model it linearises.

circuit-tracer's replacement model is linear in the residual stream once three things are
held at their values on the prompt: attention patterns, normalisation scales (the
``rsqrt`` of every RMSNorm) and the MLPs (replaced by their transcoders' active features,
constant activations, plus an error node; only a skip connection stays live). What is left
is a chain of elementwise scales, value and output projections and pattern mixing, whose
transpose the engine applies by hand (:mod:`em_circuits.attribution.engine`).

This module runs the model once per prompt batch (right-padded: with causal attention a
real position never sees the padding after it) and keeps only what that transpose needs:
each layer's attention patterns and norm scales, the active features of every position, the
error vectors and the last position's logits. Architectures: Llama, Qwen2/2.5, Qwen3 (pre-norm
layers) and Gemma-2 (sandwich norms, ``1 + w`` norm weights, a scaled embedding), with
per-layer transcoders at any read and write site circuit-tracer maps for them; other
architectures take circuit-tracer's own path.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from safetensors import safe_open

from em_circuits.models.hooks import (
    NORMALISED_INPUT,
    UnsupportedInterventionError,
    hook_sites,
    record_input_at,
)
from em_circuits.models.load import right_padded

#: Where a transcoder reads, relative to the norm before the MLP.
ReadKind = Literal["residual", "normalised", "normed"]
#: Where it writes: the MLP's output, or what is added to the residual (after a post-MLP norm).
WriteKind = Literal["mlp", "added"]


#: Model types whose linearisation the test suite checks against circuit-tracer (stand-ins
#: of each, and the toy organism's Llama); others take circuit-tracer's own path.
TESTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma2")


class EngineUnsupportedError(ValueError):
    """The model or transcoders need circuit-tracer's own (nnsight) path."""


@dataclass
class LayerParts:
    """One decoder layer's modules the linearised backward reads."""

    input_norm: torch.nn.Module
    attention_out_norm: torch.nn.Module | None  # Gemma: post_attention_layernorm
    mlp_norm: torch.nn.Module  # the norm before the MLP
    mlp_out_norm: torch.nn.Module | None  # Gemma: post_feedforward_layernorm
    v_proj: torch.nn.Module
    o_proj: torch.nn.Module
    mlp: torch.nn.Module
    transcoder: Any
    read: tuple[torch.nn.Module, str]  # (module, side), the transcoder's input site
    write: tuple[torch.nn.Module, str]


def _norm_eps(norm: torch.nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise EngineUnsupportedError(f"{type(norm).__name__} has no epsilon: not an RMSNorm")


@dataclass
class LinearisedModel:
    """A Hugging Face decoder and its per-layer transcoders, as the engine linearises them."""

    hf_model: torch.nn.Module
    transcoders: Any
    layers: list[LayerParts]
    read_kind: ReadKind
    write_kind: WriteKind
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_offset: float  # Gemma's norms scale by (1 + w)
    embed_scale: float | None  # Gemma multiplies the embedding by sqrt(d_model)
    final_norm: torch.nn.Module
    embed_weight: torch.Tensor
    zero_positions: slice

    @classmethod
    def of(
        cls, hf_model: torch.nn.Module, transcoders: Any, zero_positions: slice
    ) -> LinearisedModel:
        """Resolve the modules; :class:`EngineUnsupportedError` names what does not fit."""
        from circuit_tracer.transcoder import TranscoderSet

        transcoders = getattr(transcoders, "_module", transcoders)
        if not isinstance(transcoders, TranscoderSet):
            raise EngineUnsupportedError(
                f"the torch engine needs per-layer transcoders, not {type(transcoders).__name__}"
            )
        config: Any = hf_model.config
        inner: Any = getattr(hf_model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
            raise EngineUnsupportedError(f"{type(hf_model).__name__} has no model.layers")
        model_type = str(getattr(config, "model_type", ""))
        if model_type not in TESTED_MODEL_TYPES:
            raise EngineUnsupportedError(
                f"the torch engine is tested on {', '.join(TESTED_MODEL_TYPES)} models, not "
                f"{model_type or type(hf_model).__name__}"
            )
        gemma = model_type.startswith("gemma")
        layers = []
        kinds: set[tuple[str, str]] = set()
        for index, layer in enumerate(inner.layers):
            mlp_norm = getattr(layer, "pre_feedforward_layernorm", None) or (
                layer.post_attention_layernorm
            )
            try:
                read, write = hook_sites(hf_model, transcoders, index)
            except UnsupportedInterventionError as err:
                raise EngineUnsupportedError(str(err)) from None
            parts = LayerParts(
                input_norm=layer.input_layernorm,
                attention_out_norm=layer.post_attention_layernorm if gemma else None,
                mlp_norm=mlp_norm,
                mlp_out_norm=getattr(layer, "post_feedforward_layernorm", None),
                v_proj=layer.self_attn.v_proj,
                o_proj=layer.self_attn.o_proj,
                mlp=layer.mlp,
                transcoder=transcoders[index],
                read=read,
                write=write,
            )
            kinds.add((_read_kind(parts), _write_kind(parts)))
            layers.append(parts)
        if len(kinds) != 1:
            raise EngineUnsupportedError(f"transcoder sites differ between layers: {kinds}")
        read_kind, write_kind = kinds.pop()
        n_heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return cls(
            hf_model=hf_model,
            transcoders=transcoders,
            layers=layers,
            read_kind=read_kind,  # type: ignore[arg-type]
            write_kind=write_kind,  # type: ignore[arg-type]
            n_heads=n_heads,
            n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
            head_dim=int(head_dim),
            norm_offset=1.0 if gemma else 0.0,
            embed_scale=float(config.hidden_size) ** 0.5 if gemma else None,
            final_norm=inner.norm,
            embed_weight=inner.embed_tokens.weight,
            zero_positions=zero_positions,
        )

    def norm_weight(self, norm: torch.nn.Module) -> torch.Tensor:
        """The elementwise factor a norm applies after its frozen scale, in float32."""
        weight: torch.Tensor = norm.weight  # type: ignore[assignment]
        return weight.float() + self.norm_offset

    def embed_factor(self, dtype: torch.dtype) -> float:
        """d residual / d embedding: Gemma's normaliser as the model rounds it."""
        if self.embed_scale is None:
            return 1.0
        return float(torch.tensor(self.embed_scale, dtype=dtype))

    def norms(self) -> list[torch.nn.Module]:
        """Every norm whose scale is frozen, in a fixed order: the layers' then the final."""
        out: list[torch.nn.Module] = []
        for parts in self.layers:
            out.append(parts.input_norm)
            if parts.attention_out_norm is not None:
                out.append(parts.attention_out_norm)
            out.append(parts.mlp_norm)
            if parts.mlp_out_norm is not None:
                out.append(parts.mlp_out_norm)
        out.append(self.final_norm)
        return out


def _read_kind(parts: LayerParts) -> str:
    module, side = parts.read
    if module is parts.mlp_norm:
        return {"input": "residual", "output": "normed", NORMALISED_INPUT: "normalised"}[side]
    raise EngineUnsupportedError(
        f"the transcoders read at {type(module).__name__} ({side}), not at the norm before the MLP"
    )


def _write_kind(parts: LayerParts) -> str:
    module, side = parts.write
    if side == "output" and module is parts.mlp_out_norm:
        return "added"
    if side == "output" and hasattr(module, "down_proj"):
        return "mlp"
    raise EngineUnsupportedError(
        f"the transcoders write at {type(module).__name__} ({side}), not at the MLP's output"
    )


@dataclass
class LayerFeatures:
    """One prompt's active features at one layer, sorted by position then feature."""

    positions: torch.Tensor  # (n,) int64
    features: torch.Tensor  # (n,) int64
    activations: torch.Tensor  # (n,) float32


@dataclass
class FrozenPrompt:
    """What the linearised backward needs of one prompt's forward pass."""

    ids: torch.Tensor  # (n_pos,)
    logits: torch.Tensor  # (vocab,) float32, the last position
    layer_features: list[LayerFeatures]
    errors: torch.Tensor  # (n_layers, n_pos, d_model) float32
    #: each layer's MLP input (n_pos, d_model), kept when asked for (an adapter's reads)
    mlp_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    #: (n_layers, n_zero, d_model) float32: what each layer's MLP writes at the zero positions
    #: (BOS) beyond its skip connection, which no node carries there (its error is zeroed)
    bos_mlp: torch.Tensor | None = None

    @property
    def n_pos(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class FrozenBatch:
    """A batch of prompts' frozen forward passes, padded to a common length."""

    prompts: list[FrozenPrompt]
    patterns: list[torch.Tensor]  # per layer (batch, heads, pos, pos)
    scales: dict[int, torch.Tensor] = field(default_factory=dict)  # id(norm) -> (batch, pos, 1)
    #: what the pass's recording made of it (see :func:`frozen_forward`)
    recorded: Any = None

    @property
    def n_pos(self) -> int:
        return int(self.patterns[0].shape[-1])


def _scale_hook(norm: torch.nn.Module, scales: dict[int, torch.Tensor]) -> Any:
    eps = _norm_eps(norm)

    def hook(_module: torch.nn.Module, args: tuple) -> None:
        x = args[0].float()
        scales[id(norm)] = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    return norm.register_forward_pre_hook(hook)


class PassRecording(Protocol):
    """Something else recorded from the frozen forward pass of one prompt (an adapter's nodes,
    :class:`~em_circuits.attribution.prompt_adapter_nodes.AdapterRecording`)."""

    def hooks(self) -> AbstractContextManager[None]: ...

    def writes(self) -> Any: ...


def frozen_forward(
    model: LinearisedModel,
    sequences: Sequence[torch.Tensor],
    position_chunk: int = 512,
    keep_mlp_inputs: bool = False,
    recording: PassRecording | None = None,
) -> FrozenBatch:
    """One forward pass over ``sequences`` (right-padded), encoding every layer's transcoder
    on each prompt's own positions ``position_chunk`` at a time (bounded memory).

    ``recording`` (one prompt) has its hooks open during the pass and its ``writes()``
    taken while the attention is still eager; they are the batch's ``recorded``."""
    hf: Any = model.hf_model
    device = model.embed_weight.device
    ids, mask = right_padded([s.cpu() for s in sequences], pad_id=0)
    ids, mask = ids.to(device), mask.to(device)
    scales: dict[int, torch.Tensor] = {}
    reads: dict[int, Any] = {}
    writes: dict[int, Any] = {}
    handles = [_scale_hook(norm, scales) for norm in model.norms()]
    mlp_inputs: dict[int, torch.Tensor] = {}
    for index, parts in enumerate(model.layers):
        # the values at the transcoder's read and write sites (both module outputs or inputs)
        handles.append(record_input_at(parts.read, index, reads))
        handles.append(record_input_at(parts.write, index, writes))
        if keep_mlp_inputs:
            handles.append(record_input_at((parts.mlp, "input"), index, mlp_inputs))
    lengths = [int(len(s)) for s in sequences]
    # Only the last positions' logits: at 2,048 tokens all of them would take a GiB.
    keep = sorted({n - 1 for n in lengths})
    implementation = hf.config._attn_implementation
    hf.config._attn_implementation = "eager"  # the patterns themselves, as circuit-tracer reads
    recorded = None
    try:
        try:
            with torch.no_grad(), recording.hooks() if recording else nullcontext():
                out = hf(
                    input_ids=ids,
                    attention_mask=mask,
                    output_attentions=True,
                    use_cache=False,
                    logits_to_keep=torch.tensor(keep, device=device),
                )
        finally:
            for handle in handles:
                handle.remove()
        if recording is not None:
            # after this pass's hooks are gone (it runs modules again), attention still eager
            recorded = recording.writes()
    finally:
        hf.config._attn_implementation = implementation
    prompts = []
    for row, length in enumerate(lengths):
        logits = out.logits[row, keep.index(length - 1)].detach().float()
        per_layer, errors, bos = [], [], []
        for index in range(len(model.layers)):
            x = reads[index][row, :length]
            features, reconstruction = _encode(model, index, x, position_chunk)
            error = writes[index][row, :length].float() - reconstruction
            # no feature is active there: the error plus the decoder bias is the write less skip
            bias = model.layers[index].transcoder.b_dec.float()
            bos.append(error[model.zero_positions] + bias)
            error[model.zero_positions] = 0
            per_layer.append(features)
            errors.append(error)
        kept = {layer: x[row, :length] for layer, x in mlp_inputs.items()}
        prompts.append(
            FrozenPrompt(
                ids[row, :length], logits, per_layer, torch.stack(errors), kept, torch.stack(bos)
            )
        )
    patterns = [p.detach().float() for p in out.attentions]
    del out
    if min(lengths) < max(lengths):  # padding carries no gradient
        valid = mask[:, None, :, None].float()
        for pattern in patterns:
            pattern.mul_(valid)  # in place: at 2,048 tokens the patterns take GiBs
        for k in list(scales):
            scales[k] = scales[k] * mask[:, :, None].float()
    return FrozenBatch(prompts, patterns, scales, recorded)


#: Lazy decoders read whole onto the GPU, by transcoder set: a list per layer, or None where
#: they did not fit.
_RESIDENT_DECODERS: weakref.WeakKeyDictionary[Any, list[torch.Tensor] | None] = (
    weakref.WeakKeyDictionary()
)
#: The share of the GPU's free memory resident decoders may take.
RESIDENT_DECODER_SHARE = 0.4


def resident_decoders(transcoders: Any) -> list[torch.Tensor] | None:
    """Each layer's whole decoder on the GPU, in the file's dtype, for a set whose decoders
    the loader left on disk (large sets, as circuit-tracer's presets): read once instead of
    once per layer and graph (a file read of every active feature's row, milliseconds each).
    None where the set is not lazy, not on a GPU, or the decoders would take more than
    :data:`RESIDENT_DECODER_SHARE` of the free GPU memory."""
    if transcoders in _RESIDENT_DECODERS:
        return _RESIDENT_DECODERS[transcoders]

    layers = list(transcoders)
    found: list[torch.Tensor] | None = None
    device = layers[0].b_dec.device
    if all(getattr(tc, "lazy_decoder", False) for tc in layers) and device.type == "cuda":
        sizes = []
        for tc in layers:
            with safe_open(tc.transcoder_path, framework="pt", device="cpu") as f:
                part = f.get_slice("W_dec")
                sizes.append(math.prod(part.get_shape()) * _DTYPE_BYTES.get(part.get_dtype(), 4))
        free, _total = torch.cuda.mem_get_info(device)
        if sum(sizes) <= RESIDENT_DECODER_SHARE * free:
            found = []
            for tc in layers:
                with safe_open(tc.transcoder_path, framework="pt", device=str(device)) as f:
                    found.append(f.get_tensor("W_dec"))
    _RESIDENT_DECODERS[transcoders] = found
    return found


_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}


def decoder_rows(model: LinearisedModel, layer: int, index: torch.Tensor) -> torch.Tensor:
    """``W_dec[index]`` of the layer's transcoder in float32, with the values circuit-tracer
    reads (the stored rows cast to the transcoders' dtype)."""
    transcoder = model.layers[layer].transcoder
    resident = resident_decoders(model.transcoders)
    if resident is None:
        return transcoder._get_decoder_vectors(index).float()
    return resident[layer][index].to(transcoder.dtype).float()


def _encode(
    model: LinearisedModel, layer: int, x: torch.Tensor, chunk: int
) -> tuple[LayerFeatures, torch.Tensor]:
    """Active features of one layer on one prompt (as circuit-tracer's ``encode_sparse``: the
    nonzero activations, none at the zero positions) and the reconstruction they and the skip
    connection and decoder bias make, in float32."""
    transcoder = model.layers[layer].transcoder
    n_pos = x.shape[0]
    zero = torch.zeros(n_pos, dtype=torch.bool, device=x.device)
    zero[model.zero_positions] = True
    reconstruction = torch.zeros(n_pos, x.shape[1], device=x.device, dtype=torch.float32)
    positions, features, values = [], [], []
    for start in range(0, n_pos, chunk):
        acts = transcoder.encode(x[start : start + chunk])
        acts[zero[start : start + chunk]] = 0
        pos, feat = acts.nonzero(as_tuple=True)
        value = acts[pos, feat].float()
        decoder = decoder_rows(model, layer, feat)
        reconstruction.index_add_(0, pos + start, decoder * value[:, None])
        positions.append(pos + start)
        features.append(feat)
        values.append(value)
    found = LayerFeatures(torch.cat(positions), torch.cat(features), torch.cat(values))
    if transcoder.W_skip is not None:
        reconstruction += transcoder.compute_skip(x).float()
    reconstruction += transcoder.b_dec.float()
    return found, reconstruction

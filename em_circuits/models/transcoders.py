"""circuit-tracer transcoder objects from a resolved set, in any format we read.

circuit-tracer's own loader reads its ReLU / JumpReLU per-layer files and cross-layer sets;
TopK sets and sparsify checkpoints are built here as its ``SingleLayerTranscoder`` objects, so
everything downstream (attribution, totals, interventions) sees one kind of set.

The tensors need no transposing between the two libraries: both keep the encoder as
(latents, d_in) applied with ``F.linear``, the decoder as (latents, d_out) applied as
``acts @ W_dec``, and the skip connection as (d_out, d_in) applied as ``x @ W_skip.T``. Only
the names differ (sparsify's ``encoder.weight`` / ``encoder.bias`` are ``W_enc`` / ``b_enc``)
and the activation: sparsify takes the top k of the ReLU'd pre-activations
(:class:`ReLUTopK`), upstream circuit-tracer's TopK the top k of the raw ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
from circuit_tracer.transcoder.activation_functions import TopK
from circuit_tracer.utils.hf_utils import load_transcoders
from safetensors import safe_open

from em_circuits.models.spec import ModelLoadError
from em_circuits.models.transcoder_formats import (
    RELU_TOPK,
    SPARSIFY_KIND,
    SPARSIFY_TENSOR_NAMES,
    fit_problem,
    stored_k,
)
from em_circuits.models.transcoder_source import TranscoderSource

#: Sets at least this large keep their decoders on disk (read per active feature), as
#: circuit-tracer does for its presets; smaller ones are read whole.
LAZY_DECODER_BYTES = 1 << 30

#: TopK sets whose config says ``activation: topk`` without ``k``: upstream circuit-tracer
#: fixes k for this Llama-3.1-8B-Instruct set by name.
KNOWN_K = {"facebook/crv-8b-instruct-transcoders": 128}


class ReLUTopK(TopK):
    """sparsify's activation: the k largest pre-activations after a ReLU, so fewer than k
    fire where fewer are positive (circuit-tracer's TopK would keep negative ones). Unit
    slope where active, like TopK, so totals mode handles it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.relu(x))


def _k_value(value: Any, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelLoadError(f"{where}: 'k' must be a positive integer, not {value!r}")
    return value


def topk_per_layer(config: dict[str, Any], files: list[Path], where: Path) -> list[int] | None:
    """Each layer's k for a TopK circuit-tracer set (``activation: topk`` or ``relu_topk``, a
    ``k`` in the config, or ``k`` tensors in the layer files), None for ReLU / JumpReLU sets."""
    activation = str(config.get("activation") or "").lower() or None
    if activation not in (None, "topk", RELU_TOPK, "relu", "jumprelu"):
        raise ModelLoadError(
            f"{where}: unknown activation {config['activation']!r}; use topk or relu_topk (with "
            "k), relu or jumprelu"
        )
    if activation in ("relu", "jumprelu"):
        return None
    declared = config.get("k")
    if activation is None and declared is None and stored_k(files[0]) is None:
        return None  # circuit-tracer's default: JumpReLU with thresholds, else ReLU
    if declared is not None:
        declared = _k_value(declared, where)
    ks = []
    for path in files:
        stored = stored_k(path)
        if declared is not None and stored is not None and stored != declared:
            raise ModelLoadError(
                f"{where}: k is {declared} in the config but {stored} in {path.name}; make "
                "them agree"
            )
        k = declared if declared is not None else stored
        k = k if k is not None else KNOWN_K.get(str(config.get("repo_id")))
        if k is None:
            raise ModelLoadError(
                f"{where}: 'activation: topk' needs a positive integer 'k' (add k: N to the config)"
            )
        ks.append(_k_value(k, path))
    return ks


def _build(
    state: dict[str, torch.Tensor],
    layer: int,
    activation: Any,
    path: Path,
    lazy_decoder: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> Any:
    """A SingleLayerTranscoder holding ``state`` (circuit-tracer's names), shapes checked."""
    latents, width = state["W_enc"].shape
    want = {"W_enc": (latents, width), "b_enc": (latents,), "b_dec": (width,)}
    if "W_dec" in state:
        want["W_dec"] = (latents, width)
    if "W_skip" in state:
        want["W_skip"] = (width, width)
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise ModelLoadError(
                f"{path}: {name} has shape {tuple(state[name].shape)}, expected {shape} for "
                f"{latents} latents of width {width}"
            )
    transcoder = SingleLayerTranscoder(
        width,
        latents,
        activation,
        layer,
        skip_connection="W_skip" in state,
        transcoder_path=str(path),
        lazy_decoder=lazy_decoder,
        device=torch.device("meta"),
        dtype=dtype,
    )
    moved = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    transcoder.load_state_dict(moved, assign=True)
    return transcoder


def _read(
    path: Path,
    names: dict[str, str],
    optional: set[str],
    lazy_decoder: bool,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file under circuit-tracer's names (``names``: ours -> the
    file's), read straight onto ``device``; the decoder stays on disk when lazy."""
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        keys = set(handle.keys())
        missing = [key for ours, key in names.items() if key not in keys and ours not in optional]
        if missing:
            raise ModelLoadError(f"{path}: no tensor(s) {', '.join(missing)}")
        state = {
            ours: handle.get_tensor(key)
            for ours, key in names.items()
            if key in keys and not (lazy_decoder and ours == "W_dec")
        }
        if lazy_decoder:  # checked here: a lazy decoder is read by slices only later
            shape = tuple(handle.get_slice(names["W_dec"]).get_shape())
            if shape != tuple(state["W_enc"].shape):
                raise ModelLoadError(f"{path}: W_dec has shape {shape}, not W_enc's")
    return state


_CIRCUIT_TRACER_NAMES = {n: n for n in ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip")}


def _as_set(transcoders: list[Any], config: dict[str, Any]) -> Any:
    return TranscoderSet(
        dict(enumerate(transcoders)),
        feature_input_hook=config["feature_input_hook"],
        feature_output_hook=config["feature_output_hook"],
        scan=config["scan"],
    )


def _sparsify_set(
    source: TranscoderSource, device: torch.device, dtype: torch.dtype, lazy_decoder: bool
) -> Any:
    config = source.config
    skip = bool(config["skip_connection"])
    built = []
    for layer, (path, k) in enumerate(zip(source.files, config["k"])):
        optional = set() if skip else {"W_skip"}
        state = _read(path, SPARSIFY_TENSOR_NAMES, optional, lazy_decoder, device)
        if not skip and "W_skip" in state:
            raise ModelLoadError(
                f"{path}: holds W_skip but its cfg.json says skip_connection false"
            )
        if state["W_enc"].shape != (config["num_latents"], config["d_in"]):
            raise ModelLoadError(
                f"{path}: encoder.weight has shape {tuple(state['W_enc'].shape)}, but cfg.json "
                f"says {config['num_latents']} latents of width {config['d_in']}"
            )
        built.append(_build(state, layer, ReLUTopK(k), path, lazy_decoder, device, dtype))
    return _as_set(built, config)


def build_transcoder_set(source: TranscoderSource, device: torch.device, dtype: torch.dtype):
    """The circuit-tracer transcoders of a resolved set, on ``device`` in ``dtype``."""
    config = dict(source.config)
    lazy_decoder = sum(p.stat().st_size for p in source.files) >= LAZY_DECODER_BYTES
    if config["model_kind"] == SPARSIFY_KIND:
        return _sparsify_set(source, device, dtype, lazy_decoder)
    if config["model_kind"] != "transcoder_set":
        return load_transcoders(config, device=device, dtype=dtype, lazy_encoder=False)
    ks = topk_per_layer(config, source.files, source.config_path)
    if ks is None:
        return load_transcoders(
            config, device=device, dtype=dtype, lazy_encoder=False, lazy_decoder=lazy_decoder
        )
    topk = ReLUTopK if str(config.get("activation")).lower() == RELU_TOPK else TopK
    built = [
        _build(
            _read(path, _CIRCUIT_TRACER_NAMES, {"W_skip"}, lazy_decoder, device),
            layer,
            topk(k),
            path,
            lazy_decoder,
            device,
            dtype,
        )
        for layer, (path, k) in enumerate(zip(source.files, ks))
    ]
    return _as_set(built, config)


def check_fit(ref: str, transcoders: Any, model_config: Any, where: str) -> None:
    """A one-line ModelLoadError naming the set and the fix when ``transcoders`` cannot
    replace the MLPs of the model ``model_config`` describes (at ``where``)."""
    module = getattr(transcoders, "_module", transcoders)  # an nnsight Envoy wraps the module
    d_model = getattr(module, "d_model", None)
    if d_model is None:
        d_model = module.transcoders[0].d_model
    problem = fit_problem(int(module.n_layers), int(d_model), model_config)
    if problem is not None:
        raise ModelLoadError(f"transcoders {ref} do not fit {where}: {problem}")


def active_entries(
    transcoder: Any, inputs: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, position, feature, activation) of every positive activation of ``transcoder``
    on ``inputs`` (batch x positions x d_model) at ``valid`` positions, in (row, position)
    order.

    A TopK transcoder's activations are its pre-activations at the top k features (where
    positive), so those are read from ``torch.topk`` directly: the same values and features
    as its dense ``encode``, without materialising, masking and scanning a batch x positions
    x features tensor (1 G elements per batch at a 131k-feature width)."""
    activation = getattr(transcoder, "activation_function", None)
    if isinstance(activation, TopK):
        pre = transcoder.encode(inputs, apply_activation_function=False)
        top_values, top_features = torch.topk(pre, activation.k, dim=-1)
        keep = (top_values > 0) & valid[..., None]
        rows, positions, slots = torch.nonzero(keep, as_tuple=True)
        features = top_features[rows, positions, slots]
        values = top_values[rows, positions, slots]
    else:
        acts = transcoder.encode(inputs).masked_fill(~valid[..., None], 0)
        # nonzero walks (row, position, feature) in order: document order per feature.
        rows, positions, features = torch.nonzero(acts > 0, as_tuple=True)
        values = acts[rows, positions, features]
    return rows, positions, features, values.float()

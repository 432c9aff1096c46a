"""Feature interventions on the real model, nothing frozen.

Attribution linearises: attention patterns and normalisation scales are frozen and every
effect is a product of gradients. A measured effect runs the model itself: at a feature's
layer its live activation a (the transcoder's encoder on the live MLP input) is replaced by
a chosen value v by adding (v - a) W_dec[f] to the MLP output at that position; everything
downstream (attention patterns, normalisation, the real MLPs, other features) responds. This
is circuit-tracer's iterative patching without its attention freeze, done with plain PyTorch
hooks on the Hugging Face modules its hook mapping names (circuit-tracer 0.5 cannot run
unfrozen interventions on token ids: it re-tokenizes the input to count positions).

Per-layer transcoders only (a cross-layer transcoder writes to every later layer); others
get :class:`UnsupportedInterventionError`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from em_circuits.models.load import LoadedModel

#: (layer, position, transcoder feature, value), as circuit-tracer's interventions.
Intervention = tuple[int, int, int, float]


class UnsupportedInterventionError(ValueError):
    """The model's transcoders or hooks cannot be intervened on outside circuit-tracer."""


def _module_at(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """``model.layers[3].mlp`` -> that submodule."""
    module = root
    for part in path.split("."):
        match = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", part)
        if match is None:
            raise UnsupportedInterventionError(f"cannot resolve module path {path!r}")
        module = getattr(module, match.group(1))
        if match.group(2) is not None:
            module = module[int(match.group(2))]
    return module


def transcoder_set(model: LoadedModel):
    """The model's transcoder module itself (circuit-tracer wraps it in an nnsight Envoy)."""
    transcoders = model.replacement.transcoders
    return getattr(transcoders, "_module", transcoders)


def _hook_sites(model: LoadedModel, layer: int) -> tuple[tuple, tuple]:
    """((module, side) where the transcoder reads, (module, side) where it writes)."""
    from circuit_tracer.transcoder import TranscoderSet
    from circuit_tracer.utils.tl_nnsight_mapping import get_mapping

    from em_circuits.models.architectures import architecture_of, register_extra_architectures

    transcoders = transcoder_set(model)
    if not isinstance(transcoders, TranscoderSet):
        raise UnsupportedInterventionError(
            "measured (unfrozen) interventions need per-layer transcoders; "
            f"{type(transcoders).__name__} writes to several layers"
        )
    register_extra_architectures()
    mapping = get_mapping(architecture_of(model.hf_model.config)).feature_hook_mapping
    sites = []
    for hook in (transcoders.feature_input_hook, transcoders.feature_output_hook):
        template, side = mapping[hook]
        sites.append((_module_at(model.hf_model, template.format(layer=layer)), side))
    return sites[0], sites[1]


def _tensor_of(value):
    return value[0] if isinstance(value, tuple) else value


@torch.no_grad()
def real_model_logits(
    model: LoadedModel, ids: torch.Tensor, interventions: Sequence[Intervention]
) -> torch.Tensor:
    """Next-token logits (positions x vocabulary) of the real model with each listed
    feature instance set to its value; an empty list gives the clean logits."""
    by_layer: dict[int, list[tuple[int, int, float]]] = defaultdict(list)
    for layer, pos, feature, value in interventions:
        by_layer[int(layer)].append((int(pos), int(feature), float(value)))
    handles = []
    live_inputs: dict[int, torch.Tensor] = {}
    try:
        for layer, changes in by_layer.items():
            (reads, read_side), (writes, write_side) = _hook_sites(model, layer)
            transcoder = transcoder_set(model)[layer]

            def remember(layer: int = layer, side: str = read_side):
                def pre(_module, args):
                    live_inputs[layer] = args[0]

                def post(_module, _args, output):
                    live_inputs[layer] = _tensor_of(output)

                return pre if side == "input" else post

            def delta(layer: int = layer, changes=changes, transcoder=transcoder) -> torch.Tensor:
                x = live_inputs.pop(layer)
                acts = transcoder.encode(x[0])  # (positions, d_transcoder), live
                change = torch.zeros(x.shape[1:], dtype=torch.float32, device=x.device)
                for pos, feature, value in changes:
                    decoder = transcoder._get_decoder_vectors(torch.tensor([feature]))[0]
                    change[pos] += (value - acts[pos, feature].float()) * decoder.float()
                return change.to(x.dtype)

            def write(layer: int = layer, side: str = write_side):
                def pre(_module, args):
                    return (args[0] + delta(layer)[None], *args[1:])

                def post(_module, _args, output):
                    if isinstance(output, tuple):
                        return (output[0] + delta(layer)[None], *output[1:])
                    return output + delta(layer)[None]

                return pre if side == "input" else post

            for module, side, make in ((reads, read_side, remember), (writes, write_side, write)):
                if side == "input":
                    handles.append(module.register_forward_pre_hook(make()))
                else:
                    handles.append(module.register_forward_hook(make()))
        logits = model.hf_model(ids[None].to(model.device)).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits.float()


@contextmanager
def features_zeroed(model: LoadedModel, features: Sequence[tuple[int, int]]) -> Iterator[None]:
    """While inside, the real model runs with these (layer, feature) transcoder features
    ablated at every position but BOS: at each forward pass (generation included, with or
    without a KV cache) the MLP output of the feature's layer loses activation x decoder row.
    """
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, feature in features:
        by_layer[int(layer)].append(int(feature))
    handles = []
    live_inputs: dict[int, torch.Tensor] = {}
    try:
        for layer, chosen in by_layer.items():
            (reads, read_side), (writes, write_side) = _hook_sites(model, layer)
            transcoder = transcoder_set(model)[layer]
            index = torch.tensor(chosen)
            decoders = transcoder._get_decoder_vectors(index).float()  # (k, d_model)

            def remember(layer: int = layer, side: str = read_side):
                def pre(_module, args):
                    live_inputs[layer] = args[0]

                def post(_module, _args, output):
                    live_inputs[layer] = _tensor_of(output)

                return pre if side == "input" else post

            def removed(layer: int = layer, transcoder=transcoder, index=index, decoders=decoders):
                x = live_inputs.pop(layer)
                acts = transcoder.encode(x).float()[..., index.to(x.device)]  # (b, pos, k)
                change = acts @ decoders.to(x.device)
                if x.shape[1] > 1:
                    change[:, 0] = 0  # a whole prompt: its first position is BOS
                return change.to(x.dtype)

            def write(layer: int = layer, side: str = write_side):
                def pre(_module, args):
                    return (args[0] - removed(layer), *args[1:])

                def post(_module, _args, output):
                    if isinstance(output, tuple):
                        return (output[0] - removed(layer), *output[1:])
                    return output - removed(layer)

                return pre if side == "input" else post

            for module, side, make in ((reads, read_side, remember), (writes, write_side, write)):
                if side == "input":
                    handles.append(module.register_forward_pre_hook(make()))
                else:
                    handles.append(module.register_forward_hook(make()))
        yield
    finally:
        for handle in handles:
            handle.remove()

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from em_circuits.models.architectures import architecture_of, register_extra_architectures
from em_circuits.models.edit_positions import EditPositions, edit_positions
from em_circuits.models.frozen_attention import patterns_frozen
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
        if match is None or not hasattr(module, match.group(1)):
            raise UnsupportedInterventionError(f"cannot resolve module path {path!r}")
        module = getattr(module, match.group(1))
        if match.group(2) is not None:
            module = module[int(match.group(2))]
    return module


#: Values inside a module's forward that circuit-tracer reads through nnsight's ``.source``
#: (``<module>.source.<call>``) and a plain hook can give, as a read side: ``self__norm_0`` is
#: an RMSNorm's ``self._norm(x.float())``, the normalised input before the norm's weight
#: (gemma-scope's ``ln2.hook_normalized`` on Gemma-2 and Gemma-3).
NORMALISED_INPUT = "normalised_input"
_SOURCE_READS = {"self__norm_0": NORMALISED_INPUT}


def _inside_module_problem(template: str, side: str, writes: bool) -> str | None:
    """Why plain hooks cannot give the value a hook-mapping entry names, or None."""
    inner = template.partition(".source.")[2]
    if not inner or (not writes and side == "output" and inner in _SOURCE_READS):
        return None
    return (
        f"the transcoders {'write' if writes else 'read'} at {template!r}, a value inside "
        "a module's forward that plain PyTorch hooks cannot "
        f"{'change' if writes else 'read'}; measured interventions, the quality check "
        "and feature cards need transcoders at module inputs or outputs"
    )


def sites_problem(architecture: str, input_hook: str, output_hook: str) -> str | None:
    """Why measured interventions, the quality check and feature cards cannot run for
    transcoders at these hooks of ``architecture`` (no model loaded), or None."""
    from circuit_tracer.utils.tl_nnsight_mapping import get_mapping

    register_extra_architectures()
    mapping = get_mapping(architecture).feature_hook_mapping
    for writes, hook in enumerate((input_hook, output_hook)):
        if hook not in mapping:
            return f"the transcoders' hook {hook!r} does not exist for {architecture}"
        problem = _inside_module_problem(*mapping[hook], bool(writes))
        if problem:
            return problem
    return None


def _site(root: torch.nn.Module, template: str, side: str, writes: bool) -> tuple:
    """(module, side) for a hook-mapping entry; a value inside a module's forward is a read
    side of that module where known, else UnsupportedInterventionError."""
    path, _, inner = template.partition(".source.")
    module = _module_at(root, path)
    if not inner:
        return module, side
    problem = _inside_module_problem(template, side, writes)
    if problem is None and not callable(getattr(module, "_norm", None)):
        problem = f"{type(module).__name__} at {path!r} has no _norm for {template!r}"
    if problem:
        raise UnsupportedInterventionError(problem)
    return module, _SOURCE_READS[inner]


def transcoder_set(model: LoadedModel):
    """The model's transcoder module itself (circuit-tracer wraps it in an nnsight Envoy)."""
    transcoders = model.replacement.transcoders
    return getattr(transcoders, "_module", transcoders)


def unsupported_reason(model: LoadedModel) -> str | None:
    """Why real-model interventions cannot run on this model, or None when they can."""
    try:
        _hook_sites(model, 0)
    except UnsupportedInterventionError as err:
        return str(err)
    return None


def hook_sites(hf_model: torch.nn.Module, transcoders: Any, layer: int) -> tuple[tuple, tuple]:
    """((module, side) where the transcoder of ``layer`` reads, (module, side) where it
    writes) in a Hugging Face model, as circuit-tracer's hook mapping names them: the sites
    attribution uses. ``transcoders`` is a per-layer set (or its nnsight Envoy)."""
    from circuit_tracer.transcoder import TranscoderSet
    from circuit_tracer.utils.tl_nnsight_mapping import get_mapping

    transcoders = getattr(transcoders, "_module", transcoders)
    if not isinstance(transcoders, TranscoderSet):
        raise UnsupportedInterventionError(
            "measured (unfrozen) interventions need per-layer transcoders; "
            f"{type(transcoders).__name__} writes to several layers"
        )
    register_extra_architectures()
    architecture = architecture_of(hf_model.config)
    mapping = get_mapping(architecture).feature_hook_mapping
    sites = []
    for writes, hook in enumerate(
        (transcoders.feature_input_hook, transcoders.feature_output_hook)
    ):
        if hook not in mapping:
            raise UnsupportedInterventionError(
                f"the transcoders' hook {hook!r} does not exist for {architecture}"
            )
        template, side = mapping[hook]
        sites.append(_site(hf_model, template.format(layer=layer), side, bool(writes)))
    return sites[0], sites[1]


def _hook_sites(model: LoadedModel, layer: int) -> tuple[tuple, tuple]:
    return hook_sites(model.hf_model, transcoder_set(model), layer)


def _tensor_of(value):
    return value[0] if isinstance(value, tuple) else value


def record_input_at(site: tuple, layer: int, seen: dict[int, torch.Tensor]) -> Any:
    """A hook on a read site (``hook_sites(...)[0]``) that stores, at each forward pass, what
    the transcoder of ``layer`` reads (batch x positions x d_model) in ``seen[layer]``;
    returns its handle. Any (module, side) site serves: a write site gives the value the
    transcoder replaces there."""
    reads, side = site

    def pre(_module, args):
        seen[layer] = args[0]

    def post(_module, _args, output):
        seen[layer] = _tensor_of(output)

    def normalised(module, args):
        seen[layer] = module._norm(args[0].float())  # as the norm's forward computes it

    if side == NORMALISED_INPUT:
        return reads.register_forward_pre_hook(normalised)
    if side == "input":
        return reads.register_forward_pre_hook(pre)
    return reads.register_forward_hook(post)


def record_transcoder_input(model: LoadedModel, layer: int, seen: dict[int, torch.Tensor]) -> Any:
    """A hook that stores, at each forward pass, what the transcoder of ``layer`` reads (its
    live input, batch x positions x d_model) in ``seen[layer]``; returns its handle."""
    return record_input_at(_hook_sites(model, layer)[0], layer, seen)


def transcoder_inputs(
    model: LoadedModel, ids: torch.Tensor, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """What the transcoders of ``layers`` read on one forward pass of ``ids`` (batch x
    positions, or one row of positions), by layer."""
    seen: dict[int, torch.Tensor] = {}
    handles = [record_transcoder_input(model, layer, seen) for layer in layers]
    try:
        model.hf_model(ids if ids.dim() == 2 else ids[None])
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _edit_mlp_output(
    model: LoadedModel, layer: int, change: Callable[[torch.Tensor], torch.Tensor]
) -> list[Any]:
    """Hooks that keep the transcoder's live input at ``layer`` (batch, positions, d_model)
    and add ``change(input)`` to what the transcoder replaces there (the MLP output);
    returns the hook handles."""
    (_, (writes, write_side)) = _hook_sites(model, layer)
    seen: dict[int, torch.Tensor] = {}
    handles = [record_transcoder_input(model, layer, seen)]

    def write_pre(_module, args):
        return (args[0] + change(seen.pop(layer)), *args[1:])

    def write_post(_module, _args, output):
        if isinstance(output, tuple):
            return (output[0] + change(seen.pop(layer)), *output[1:])
        return output + change(seen.pop(layer))

    if write_side == "input":
        handles.append(writes.register_forward_pre_hook(write_pre))
    else:
        handles.append(writes.register_forward_hook(write_post))
    return handles


@contextmanager
def _edits(
    model: LoadedModel, changes: dict[int, Callable[[torch.Tensor], torch.Tensor]]
) -> Iterator[None]:
    handles: list[Any] = []
    try:
        for layer, change in changes.items():
            handles += _edit_mlp_output(model, layer, change)
        yield
    finally:
        for handle in handles:
            handle.remove()


def _zeroed(transcoder: Any, features: list[int], positions: EditPositions):
    """The MLP-output change that ablates these features at every position but BOS: each
    row's real positions after its first (``positions``, padding untouched)."""
    index = torch.tensor(features)
    decoders = transcoder._get_decoder_vectors(index).float()  # (k, d_model)

    def change(x: torch.Tensor) -> torch.Tensor:
        acts = transcoder.encode(x).float()[..., index.to(x.device)]  # (batch, positions, k)
        removed = positions.spare(acts @ decoders.to(x.device))
        return (-removed).to(x.dtype)

    return change


@torch.no_grad()
def real_model_logits(
    model: LoadedModel, ids: torch.Tensor, interventions: Sequence[Intervention]
) -> torch.Tensor:
    """Next-token logits (positions x vocabulary) of the real model with each listed
    feature instance set to its value; an empty list gives the clean logits."""
    with _edits(model, _set_in_rows(model, [interventions])):
        logits = model.hf_model(ids[None].to(model.device)).logits[0]
    return logits.float()


#: Intervention sets run together in one forward pass of :func:`real_model_last_logits`.
ROWS_PER_PASS = 16


@torch.no_grad()
def real_model_last_logits(
    model: LoadedModel,
    ids: torch.Tensor,
    intervention_sets: Sequence[Sequence[Intervention]],
    rows_per_pass: int = ROWS_PER_PASS,
    freeze_attention: bool = False,
) -> torch.Tensor:
    """``(len(intervention_sets), vocabulary)``: the last position's logits of the real model
    under each set of interventions (as :func:`real_model_logits`), ``rows_per_pass`` sets
    per forward pass, each its own batch row of the same prompt; an empty set gives the clean
    logits. With ``freeze_attention``, every layer's attention pattern keeps its clean value
    (:func:`~em_circuits.models.frozen_attention.patterns_frozen`), as circuit-tracer's
    ``feature_intervention`` freezes it."""
    with patterns_frozen(model.hf_model, ids) if freeze_attention else nullcontext():
        return _last_logits(model, ids, intervention_sets, rows_per_pass)


def _last_logits(
    model: LoadedModel,
    ids: torch.Tensor,
    intervention_sets: Sequence[Sequence[Intervention]],
    rows_per_pass: int,
) -> torch.Tensor:
    out = []
    step = max(1, rows_per_pass)
    for start in range(0, len(intervention_sets), step):
        chunk = intervention_sets[start : start + step]
        batch = ids.reshape(1, -1).expand(len(chunk), -1).to(model.device)
        with _edits(model, _set_in_rows(model, chunk)):
            logits = model.hf_model(batch, logits_to_keep=1).logits[:, -1]
        out.append(logits.float())
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


def _set_in_rows(
    model: LoadedModel, intervention_sets: Sequence[Sequence[Intervention]]
) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
    """By layer, the MLP-output change that applies intervention set ``i`` in batch row ``i``."""
    by_layer: dict[int, list[tuple[int, int, int, float]]] = defaultdict(list)
    for row, interventions in enumerate(intervention_sets):
        for layer, pos, feature, value in interventions:
            by_layer[int(layer)].append((row, int(pos), int(feature), float(value)))
    transcoders = transcoder_set(model)
    return {layer: _set_rows_to(transcoders[layer], items) for layer, items in by_layer.items()}


def _set_rows_to(transcoder: Any, changes: list[tuple[int, int, int, float]]):
    """The MLP-output change (batch rows) that sets each (row, position, feature) to its
    value; only the changed positions are encoded (an activation depends on its position's
    input alone)."""
    rows = torch.tensor([c[0] for c in changes])
    positions = torch.tensor([c[1] for c in changes])
    features = torch.tensor([c[2] for c in changes])
    values = torch.tensor([c[3] for c in changes], dtype=torch.float32)
    decoders = transcoder._get_decoder_vectors(features).float()  # (n, d_model)

    def change(x: torch.Tensor) -> torch.Tensor:
        device = x.device
        at = (rows.to(device), positions.to(device))
        live = transcoder.encode(x[at]).float()  # (n, d_transcoder)
        current = live[torch.arange(len(features), device=device), features.to(device)]
        delta = (values.to(device) - current)[:, None] * decoders.to(device)
        out = torch.zeros(x.shape, dtype=torch.float32, device=device)
        out.index_put_(at, delta, accumulate=True)
        return out.to(x.dtype)

    return change


@contextmanager
def features_zeroed(model: LoadedModel, features: Sequence[tuple[int, int]]) -> Iterator[None]:
    """While inside, the real model runs with these (layer, feature) transcoder features
    ablated at every position but BOS: at each forward pass (generation included, with or
    without a KV cache) the MLP output of the feature's layer loses activation x decoder row.
    With a 2-D attention mask (left-padded batches) each row's BOS is its first real position
    and padding is left as it is (:mod:`~em_circuits.models.edit_positions`).
    """
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, feature in features:
        by_layer[int(layer)].append(int(feature))
    transcoders = transcoder_set(model)
    with edit_positions(model.hf_model) as positions:
        changes = {
            layer: _zeroed(transcoders[layer], f, positions) for layer, f in by_layer.items()
        }
        with _edits(model, changes):
            yield

"""What a transcoder reference holds, in the formats the field publishes.

Three layouts reach the pipeline as one
:class:`~em_circuits.models.transcoder_source.TranscoderSource`:

* circuit-tracer's ``config.yaml`` (per-layer or cross-layer sets; read in
  ``transcoder_source.py``). TopK sets say ``activation: topk`` with ``k: N`` there, as
  upstream circuit-tracer reads them; a ``k`` alone means TopK too, and layer files written by
  upstream's ``to_safetensors`` carry their ``k`` as a scalar tensor (see
  :mod:`em_circuits.models.transcoders`).
* EleutherAI sparsify checkpoints: one folder per hookpoint (``layers.3.mlp/cfg.json`` and
  ``layers.3.mlp/sae.safetensors``), optionally beside the training run's ``config.json`` that
  names them. A transcoder there (``transcode: true``) reads its hookpoint module's input and
  predicts that module's output, so ``layers.N.mlp`` is exactly circuit-tracer's
  ``mlp.hook_in`` -> ``mlp.hook_out`` of layer N; any other hookpoint (a whole layer, the
  attention, an SAE on a residual stream) does not replace the MLP and is refused.

Only configs are read here (no torch): resolving a set stays cheap for fingerprints and
``em-circuits doctor``; the weights are read in :mod:`em_circuits.models.transcoders`.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from em_circuits.models.spec import ModelLoadError, local_model_dir
from em_circuits.models.transcoder_source import (
    TranscoderSource,
    resolve_transcoders,
    transcoder_config_path,
)

#: ``model_kind`` of a resolved sparsify set (circuit-tracer's own kinds are
#: ``transcoder_set`` and ``cross_layer_transcoder``).
SPARSIFY_KIND = "sparsify"
SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
#: circuit-tracer's tensor names -> sparsify's, in a hookpoint's ``sae.safetensors``.
SPARSIFY_TENSOR_NAMES = {
    "W_enc": "encoder.weight",
    "b_enc": "encoder.bias",
    "W_dec": "W_dec",
    "b_dec": "b_dec",
    "W_skip": "W_skip",
}
#: ``activation`` of a circuit-tracer-layout set whose TopK runs over ReLU'd pre-activations,
#: as sparsify trains them (``em-circuits transcoders train`` writes it).
RELU_TOPK = "relu_topk"
#: circuit-tracer's hooks at a layer's MLP input and output (its Llama, Qwen and GPT-OSS
#: mappings define both; our Qwen2 registration copies Qwen3's).
MLP_INPUT_HOOK, MLP_OUTPUT_HOOK = "mlp.hook_in", "mlp.hook_out"

# sparsify names hookpoints after the base model's modules (``layers.3.mlp``); a checkpoint
# made from the causal-LM wrapper says ``model.layers.3.mlp``; ``_`` and ``[3]`` spellings
# appear in hand-converted sets.
_MLP_HOOKPOINT = re.compile(r"(?:model[._])?layers(?:[._](\d+)|\[(\d+)\])[._]mlp")

#: sparsify's defaults for fields an older cfg.json leaves out (its SparseCoderConfig).
_SPARSIFY_DEFAULTS: dict[str, Any] = {
    "activation": "topk",
    "expansion_factor": 32,
    "num_latents": 0,
    "k": 32,
    "skip_connection": False,
    "transcode": False,
}


def mlp_layer(hookpoint: str) -> int | None:
    """The layer whose MLP a sparsify hookpoint names, or None for any other module."""
    match = _MLP_HOOKPOINT.fullmatch(hookpoint)
    return None if match is None else int(match.group(1) or match.group(2))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _run_hookpoints(folder: Path) -> list[str] | None:
    """The hookpoints a sparsify training run's ``config.json`` names, if it is one."""
    run_config = folder / "config.json"
    if not run_config.is_file():
        return None
    try:
        names = json.loads(run_config.read_text()).get("hookpoints")
    except (OSError, ValueError, AttributeError):
        return None  # a model's config.json, say: not a sparsify run
    return [str(n) for n in names] if isinstance(names, list) and names else None


def hookpoint_folders(folder: Path) -> dict[str, Path]:
    """A sparsify set's hookpoint folders by hookpoint: those its run config names, else
    every subfolder holding a ``cfg.json``; empty when ``folder`` is no sparsify set."""
    named = _run_hookpoints(folder)
    if named is not None:
        return {name: folder / name for name in named}
    return {
        sub.name: sub
        for sub in sorted(folder.iterdir())
        if sub.is_dir() and (sub / SPARSIFY_CONFIG).is_file()
    }


_FORMATS_HINT = (
    "give a circuit-tracer config.yaml (or its folder), an EleutherAI sparsify folder with "
    f"one <hookpoint>/{SPARSIFY_CONFIG} + {SPARSIFY_WEIGHTS} per layer, a preset or a hub id"
)


def local_transcoders(path: Path) -> Path:
    """The circuit-tracer config file or the sparsify folder an existing local path names;
    a one-line ModelLoadError for anything else."""
    if path.is_file():
        if path.name == "config.json" and _run_hookpoints(path.parent) is not None:
            return path.parent
        if path.name != SPARSIFY_CONFIG:
            return path  # a circuit-tracer config (YAML, which JSON also is)
        path = path.parent  # refused below as one hookpoint's folder
    if (path / "config.yaml").is_file():
        return path / "config.yaml"
    if hookpoint_folders(path):
        return path
    if (path / SPARSIFY_CONFIG).is_file():
        raise ModelLoadError(
            f"transcoders {path}: one sparsify hookpoint's folder; give the folder that holds "
            "one such folder per layer (layers.0.mlp, layers.1.mlp, ...)"
        )
    raise ModelLoadError(f"transcoders {path}: no transcoder set found there; {_FORMATS_HINT}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _sparsify_layer(hookpoint: str, folder: Path) -> dict[str, Any]:
    """One hookpoint's checked config: d_in, num_latents, k, skip_connection."""
    cfg_path, weights = folder / SPARSIFY_CONFIG, folder / SPARSIFY_WEIGHTS
    for needed in (cfg_path, weights):
        if not needed.is_file():
            raise ModelLoadError(
                f"{needed} not found: a sparsify hookpoint folder holds {SPARSIFY_CONFIG} and "
                f"{SPARSIFY_WEIGHTS}"
            )
    cfg = {**_SPARSIFY_DEFAULTS, **_read_json(cfg_path)}
    if mlp_layer(hookpoint) is None:
        raise ModelLoadError(
            f"{cfg_path}: hookpoint {hookpoint!r} is not a layer's MLP; the pipeline replaces "
            "each layer's MLP, so use a set trained on layers.N.mlp (sparsify --transcode "
            "--hookpoints 'layers.*.mlp')"
        )
    if not cfg["transcode"]:
        raise ModelLoadError(
            f"{cfg_path}: a sparse autoencoder (transcode: false), not a transcoder; use a set "
            "trained with --transcode, which predicts the MLP's output from its input"
        )
    if cfg["activation"] != "topk":
        raise ModelLoadError(
            f"{cfg_path}: activation {cfg['activation']!r} has no circuit-tracer counterpart; "
            "use a set trained with activation topk"
        )
    d_in = cfg.get("d_in")
    latents = cfg["num_latents"] or (d_in or 0) * cfg["expansion_factor"]
    if not (_positive_int(d_in) and _positive_int(latents) and _positive_int(cfg["k"])):
        raise ModelLoadError(
            f"{cfg_path}: d_in, k and num_latents (or expansion_factor) must be positive integers"
        )
    return {
        "d_in": d_in,
        "num_latents": latents,
        "k": cfg["k"],
        "skip_connection": bool(cfg["skip_connection"]),
        "config": cfg_path,
        "weights": weights,
    }


def read_sparsify_set(ref: str, folder: Path, scan: str) -> TranscoderSource:
    """A sparsify checkpoint folder as a transcoder source: one MLP transcoder per layer from
    0 to the last, all of one width, k per layer; refused in one line otherwise."""
    layers: dict[int, tuple[str, dict[str, Any]]] = {}
    for hookpoint, sub in hookpoint_folders(folder).items():
        described = _sparsify_layer(hookpoint, sub)
        layer = mlp_layer(hookpoint)
        assert layer is not None  # _sparsify_layer refused the others
        if layer in layers:
            raise ModelLoadError(
                f"transcoders {folder}: hookpoints {layers[layer][0]!r} and {hookpoint!r} are "
                f"both layer {layer}'s MLP; keep one"
            )
        layers[layer] = (hookpoint, described)
    if not layers:
        raise ModelLoadError(f"transcoders {folder}: no hookpoint folders; {_FORMATS_HINT}")
    missing = sorted(set(range(max(layers) + 1)) - set(layers))
    if missing:
        found = ", ".join(name for name, _ in (layers[i] for i in sorted(layers)))
        raise ModelLoadError(
            f"transcoders {folder}: no transcoder for layer(s) {missing} (found {found}); a set "
            "needs a layers.N.mlp folder for every layer of the model"
        )
    ordered = [layers[i][1] for i in range(len(layers))]
    for field in ("d_in", "num_latents", "skip_connection"):
        values = {str(layer[field]) for layer in ordered}
        if len(values) > 1:
            raise ModelLoadError(
                f"transcoders {folder}: layers differ in {field} ({', '.join(sorted(values))}); "
                "circuit-tracer needs one width and one skip setting for the whole set"
            )
    config = {
        "model_kind": SPARSIFY_KIND,
        "feature_input_hook": MLP_INPUT_HOOK,
        "feature_output_hook": MLP_OUTPUT_HOOK,
        "scan": scan,
        "hookpoints": [layers[i][0] for i in range(len(layers))],
        "transcoders": [str(layer["weights"]) for layer in ordered],
        "k": [layer["k"] for layer in ordered],
        "d_in": ordered[0]["d_in"],
        "num_latents": ordered[0]["num_latents"],
        "skip_connection": ordered[0]["skip_connection"],
    }
    run_config = folder / "config.json"
    return TranscoderSource(
        ref,
        config,
        run_config if _run_hookpoints(folder) is not None else folder,
        [layer["weights"] for layer in ordered],
        config_files=tuple(layer["config"] for layer in ordered),
    )


def hub_sparsify_folder(repo_id: str, subfolder: str, revision: str | None) -> Path | None:
    """A hub repository's sparsify set (only its configs and weights): from the local cache
    when there, else downloaded unless offline; None when the repository holds none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    prefix = f"{subfolder}/" if subfolder else ""
    patterns = [f"{prefix}*/{SPARSIFY_CONFIG}", f"{prefix}*/{SPARSIFY_WEIGHTS}"]
    patterns.append(f"{prefix}config.json")
    for cached_only in (True, False):
        if not cached_only and HF_HUB_OFFLINE:
            break
        try:
            root = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    allow_patterns=patterns,
                    local_files_only=cached_only,
                )
            )
        except Exception:  # not cached, not on the hub, no network: not a sparsify set here
            continue
        folder = root / subfolder if subfolder else root
        if folder.is_dir() and hookpoint_folders(folder):
            return folder
    return None


_SAFETENSORS_SCALARS = {"I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file (names, dtypes, shapes, offsets), read without
    loading any tensor."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def stored_k(path: Path) -> int | None:
    """The integer ``k`` a TopK layer file holds (upstream circuit-tracer's ``to_safetensors``
    writes one), else None."""
    if path.suffix != ".safetensors":
        return None
    header = safetensors_header(path)
    entry = header.get("k")
    if entry is None:
        return None
    fmt = _SAFETENSORS_SCALARS.get(entry["dtype"])
    start, end = entry["data_offsets"]
    if fmt is None or end - start != struct.calcsize(fmt):
        raise ModelLoadError(f"{path}: tensor 'k' is not one integer")
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + length + start)
        return int(struct.unpack(fmt, handle.read(end - start))[0])


def set_shape(source: TranscoderSource) -> tuple[int, int] | None:
    """(layers, model width) of a per-layer set from its configs and file headers, or None
    where they cannot be read without loading (cross-layer sets, gemma-scope's npz files)."""
    config = source.config
    if config["model_kind"] == SPARSIFY_KIND:
        return len(source.files), int(config["d_in"])
    if config["model_kind"] != "transcoder_set" or source.files[0].suffix != ".safetensors":
        return None
    b_dec = safetensors_header(source.files[0]).get("b_dec")
    return (len(source.files), int(b_dec["shape"][0])) if b_dec else None


def fit_problem(n_layers: int, d_model: int, model_config: Any) -> str | None:
    """Why a set of ``n_layers`` transcoders of width ``d_model`` cannot replace the MLPs of
    the model ``model_config`` describes, or None when it fits."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else None
    text = text or model_config
    hidden = getattr(text, "hidden_size", None)
    layers = getattr(text, "num_hidden_layers", None)
    if hidden is not None and d_model != hidden:
        return (
            f"they read and write width {d_model} but the model's hidden size is {hidden} "
            "(trained on another model); use a set trained on this model"
        )
    if layers is not None and n_layers != layers:
        what = (
            f"its layers {n_layers}..{layers - 1} have none"
            if n_layers < layers
            else f"the model has only {layers}"
        )
        return (
            f"{n_layers} layer(s) of transcoders for a {layers}-layer model ({what}); use a "
            "set with one transcoder per layer of this model"
        )
    return None


def check_transcoders_fit(spec: Any) -> None:
    """A one-line ModelLoadError, from configs and file headers only (no weights read, nothing
    downloaded), when a local transcoder set cannot serve the spec's base: hooks the
    architecture lacks, another width or layer count. Sets on the hub and bases not on this
    machine are checked when they are loaded."""
    from transformers import AutoConfig

    from em_circuits.models.architectures import check_traceable  # noqa: PLC0415  # heavy: loads torch

    if not spec.transcoders or transcoder_config_path(spec.transcoders) is None:
        return
    base_dir = local_model_dir(spec.base, spec.base_revision)
    if base_dir is None:
        return
    source = resolve_transcoders(spec.transcoders)
    config = AutoConfig.from_pretrained(base_dir)
    hooks = SimpleNamespace(
        feature_input_hook=source.config["feature_input_hook"],
        feature_output_hook=source.config["feature_output_hook"],
    )
    check_traceable(config, hooks, f"transcoders {spec.transcoders}")
    shape = set_shape(source)
    problem = fit_problem(*shape, config) if shape is not None else None
    if problem:
        raise ModelLoadError(
            f"transcoders {spec.transcoders} do not fit base {spec.base}: {problem}"
        )

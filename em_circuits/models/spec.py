"""Model specs, fingerprints, adapter merging with integrity checks, and replacement models.

A :class:`ModelSpec` names everything that decides a model's outputs: the base weights, an
optional LoRA adapter, the dtype and the transcoder set. Its fingerprint hashes all of them
(the adapter weights included), and every artifact carries the fingerprint of the model that
produced it, so results of two different models never mix.

The same code path serves the embedded toy organism (local directories) and real models
(Hugging Face ids such as ``meta-llama/Llama-3.2-1B-Instruct`` with the ``llama`` transcoders).
Every model is a circuit-tracer ``ReplacementModel`` on the nnsight backend; the object that
gives next-token logits for labeling is the one that computes attribution graphs, so stored
labels always refer to the graph's logits.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_circuits.core.store import slugify

if TYPE_CHECKING:  # torch is imported where it is used: --help and specs stay fast
    import torch


TRANSCODER_PRESETS = {"llama", "gemma"}


DTYPES = ("float32", "bfloat16", "float16")


class ModelLoadError(RuntimeError):
    """A model, adapter or transcoder set cannot be loaded as specified."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model is. ``dtype='auto'`` means bf16 on CUDA and fp32 on CPU."""

    base: str
    transcoders: str
    adapter: str | None = None
    base_revision: str | None = None
    adapter_revision: str | None = None
    dtype: str = "auto"
    name: str | None = None
    allow_base_mismatch: bool = False

    def base_only(self) -> ModelSpec:
        """The same base, dtype and transcoders without the adapter."""
        name = f"{self.name}-base" if self.name and self.adapter else self.name
        return ModelSpec(
            base=self.base,
            transcoders=self.transcoders,
            base_revision=self.base_revision,
            dtype=self.dtype,
            name=name,
        )

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        ref = self.adapter or self.base
        return Path(ref.rstrip("/")).name if os.path.isdir(ref) else ref


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (fp16 overflowed into NaNs in the prior art), fp32 on CPU."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, dtype)


def default_device() -> torch.device:
    """The GPU of this process (its local rank under a launcher), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


#: Files one of which a local directory must hold to be what it is given as: without this an
#: empty or wrong folder fails deep inside transformers with an unrelated AttributeError.
_MARKER_FILES = {
    "adapter": ("adapter_config.json",),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json", "tokenizer.model"),
}
_MODEL_MARKERS = ("config.json",)


def check_local_model_dir(path: Path, what: str = "model") -> None:
    """Raise ModelLoadError unless the directory ``path`` looks like a ``what`` (a Hugging
    Face model folder with config.json, a PEFT adapter with adapter_config.json, ...)."""
    markers = _MARKER_FILES.get(what, _MODEL_MARKERS)
    if not any((Path(path) / name).is_file() for name in markers):
        raise ModelLoadError(
            f"{what} directory {str(path)!r} has no {' or '.join(markers)}: it is not a Hugging "
            f"Face {'PEFT adapter' if what == 'adapter' else what} folder. Give the folder that "
            f"holds {markers[0]} and the weights, or a Hugging Face id"
        )


def resolve_model_dir(ref: str, revision: str | None = None, what: str = "model") -> Path:
    """A local directory as is, or a Hugging Face id downloaded (or found in the HF cache)."""
    if os.path.isdir(ref):
        check_local_model_dir(Path(ref), what)
        return Path(ref).resolve()
    if os.path.exists(ref):
        raise ModelLoadError(f"{what} {ref!r} is a file; expected a directory or a Hugging Face id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, revision=revision))
    except Exception as err:  # offline, gated, or a typo: say which and how to fix it
        raise ModelLoadError(
            f"cannot find {what} {ref!r}: it is not a local directory and downloading it from "
            f"the Hugging Face Hub failed ({type(err).__name__}: {err}). Give a local directory, "
            f"or run once with internet access (and HF_TOKEN for gated models)."
        ) from err


#: File hashes of this process by (path, size, mtime, inode, sample): a stage fingerprints
#: its models once per call, and the transcoder files alone are read in 1 MiB samples of
#: gigabytes. A file that changes gets another size or mtime and is hashed again.
_FILE_HASHES: dict[tuple[str, int, int, int, bool], str] = {}


def _sha256_file(path: Path, sample: bool = False) -> str:
    """Hash a file; for very large weight files, hash size + evenly spaced 1 MiB chunks."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, sample)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = _hash_file(path, stat.st_size, sample)
    return _FILE_HASHES[key]


def _hash_file(path: Path, size: int, sample: bool) -> str:
    digest = hashlib.sha256()
    chunk = 1 << 20
    with open(path, "rb") as handle:
        if not sample or size <= 512 * chunk:
            for block in iter(lambda: handle.read(chunk), b""):
                digest.update(block)
        else:
            digest.update(str(size).encode())
            for i in range(33):
                handle.seek(min(size - chunk, i * (size // 32)))
                digest.update(handle.read(chunk))
    return digest.hexdigest()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".yaml")


_PATH_FIELDS = {
    "adapter_config.json": ("base_model_name_or_path",),
    "config.json": ("_name_or_path",),
}


def _file_identity(file: Path, sample: bool) -> str:
    if file.name in _PATH_FIELDS:
        config = json.loads(file.read_text())
        for key in _PATH_FIELDS[file.name]:
            config.pop(key, None)
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return _sha256_file(file, sample=sample)


def _dir_identity(path: Path, sample: bool) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.suffix not in _WEIGHT_SUFFIXES or file.name.startswith("."):
            continue
        digest.update(str(file.relative_to(path)).encode())
        digest.update(_file_identity(file, sample).encode())
    return digest.hexdigest()


def _ref_identity(ref: str, revision: str | None, sample: bool) -> dict[str, Any]:
    if os.path.isdir(ref):
        return {"local": True, "content_sha256": _dir_identity(Path(ref), sample=sample)}
    return {"local": False, "id": ref, "revision": revision or "main"}


def transcoder_config_path(ref: str) -> Path | None:
    """The local transcoder config a reference names, or None for presets and HF refs."""
    path = Path(ref)
    if path.is_dir():
        path = path / "config.yaml"
    if path.is_file():
        return path.resolve()
    if os.path.sep in ref and ref not in TRANSCODER_PRESETS and (ref.startswith((".", "/"))):
        raise ModelLoadError(f"transcoder config {ref!r} does not exist")
    return None


def local_transcoder_files(config_path: Path) -> list[Path]:
    """The per-layer files a local transcoder config lists, resolved and checked to exist."""
    import yaml

    config = yaml.safe_load(config_path.read_text())
    files = config.get("transcoders")
    if not files:
        raise ModelLoadError(f"{config_path}: no 'transcoders' list of per-layer files")
    paths = [(config_path.parent / f).resolve() for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ModelLoadError(f"{config_path}: transcoder files not found: {missing}")
    return paths


def _transcoder_identity(ref: str) -> dict[str, Any]:
    config = transcoder_config_path(ref)
    if config is None:
        return {"local": False, "ref": ref}
    digest = hashlib.sha256(config.read_bytes())
    for layer_file in local_transcoder_files(config):
        digest.update(_sha256_file(layer_file, sample=True).encode())
    return {"local": True, "content_sha256": digest.hexdigest()}


def fingerprint(spec: ModelSpec, device: torch.device | str | None = None) -> str:
    """Hash of base, adapter weights, resolved dtype and transcoders (not the device)."""
    dtype = resolve_dtype(spec.dtype, device or default_device())
    identity = {
        "base": _ref_identity(spec.base, spec.base_revision, sample=True),
        "adapter": None
        if spec.adapter is None
        else _ref_identity(spec.adapter, spec.adapter_revision, sample=False),
        "dtype": str(dtype).removeprefix("torch."),
        "transcoders": _transcoder_identity(spec.transcoders),
    }
    blob = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def model_slug(spec: ModelSpec, fp: str) -> str:
    """Directory name for a model's artifacts: readable name plus fingerprint prefix."""
    return f"{slugify(spec.display_name)}--{fp[:12]}"

"""Model specs: what a model is, the device and dtype it runs in, where its files are (a local
folder or a Hugging Face snapshot), and its fingerprint.

A :class:`ModelSpec` names everything that decides a model's outputs: the base weights, an
optional LoRA adapter, the dtype and the transcoder set. Its fingerprint hashes all of them
(the adapter weights included; :mod:`em_circuits.models.content_hash`), and every artifact
carries the fingerprint of the model that produced it, so results of two different models
never mix. Transcoder references are resolved in :mod:`em_circuits.models.transcoder_source`.

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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_circuits.core.identifiers import slugify
from em_circuits.models.content_hash import dir_identity

if TYPE_CHECKING:  # torch is imported where it is used: --help and specs stay fast
    import torch


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
    #: Render chat prompts with the tokenizer's chat template when it has one (instruct
    #: models); False feeds the plain ``User: ...\nAssistant: ...`` transcript.
    chat_template: bool = True

    def base_only(self) -> ModelSpec:
        """The same base, dtype, transcoders and input rendering without the adapter."""
        name = f"{self.name}-base" if self.name and self.adapter else self.name
        return ModelSpec(
            base=self.base,
            transcoders=self.transcoders,
            base_revision=self.base_revision,
            dtype=self.dtype,
            name=name,
            chat_template=self.chat_template,
        )

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        ref = self.adapter or self.base
        return Path(ref.rstrip("/")).name if os.path.isdir(ref) else ref


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (fp16 overflowed into NaNs in the prior art), fp32 on CPU."""
    import torch  # noqa: PLC0415  # heavy: torch

    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, dtype)


def default_device() -> torch.device:
    """The GPU of this process (its local rank under a launcher), else the CPU."""
    import torch  # noqa: PLC0415  # heavy: torch

    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """The device to run on: ``None`` is :func:`default_device`; a bare ``cuda`` under
    ``accelerate launch`` is this process's own GPU (its local rank), not GPU 0 for all; a
    device this machine lacks is a one-line ModelLoadError."""
    import torch  # noqa: PLC0415  # heavy: torch

    if device is None or str(device) == "":
        return default_device()
    text = str(device)
    try:
        resolved = torch.device(text)
    except (RuntimeError, ValueError):
        raise ModelLoadError(
            f"unknown device {text!r}: use cpu, cuda or cuda:N (N a GPU index)"
        ) from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if resolved.index is None:
            resolved = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        if count == 0 or (resolved.index or 0) >= count:
            have = f"GPUs cuda:0..cuda:{count - 1}" if count else "no CUDA GPU"
            raise ModelLoadError(
                f"device {text!r} is not available on this machine ({have}); use --device cpu"
                + (" or one of those" if count else "")
            )
    elif resolved.type not in ("cpu", "mps"):
        raise ModelLoadError(f"unsupported device {text!r}: use cpu, cuda or cuda:N")
    return resolved


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


#: A hub repository id: ``owner/name`` (one slash, hub-legal characters).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_path(ref: str) -> bool:
    """A model reference meant as a local path, not a hub id: it starts with ``/``, ``.`` or
    ``~``, is no ``owner/name`` hub id (a bare name, two slashes, a backslash), or its first
    component is a folder here (``models/x`` beside ``./models``)."""
    if ref.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(ref):
        return True
    return os.path.isdir(ref.split("/")[0])


def missing_path_message(ref: str, what: str) -> str:
    """The one line for a local-looking ``ref`` that does not exist (no hub call made)."""
    where = Path(ref).expanduser().absolute()
    first = ref.split("/")[0]
    why = (
        f"{first!r} is a folder here, so it is read as a local path"
        if _HUB_ID.fullmatch(ref) and os.path.isdir(first)
        else "it is a local path, not a Hugging Face id (owner/name)"
    )
    return f"{what} {ref!r} does not exist (no folder {str(where)!r}); {why}: fix the path"


#: Hub ids resolved by this process, by (id, revision): one lookup per run, so every stage sees
#: the same commit even if the hub moves on meanwhile.
_RESOLVED: dict[tuple[str, str | None], Path] = {}


def resolve_model_dir(ref: str, revision: str | None = None, what: str = "model") -> Path:
    """A local directory as is, or a Hugging Face id downloaded (or found in the HF cache)."""
    if os.path.isdir(ref):
        check_local_model_dir(Path(ref), what)
        return Path(ref).resolve()
    if os.path.exists(ref):
        raise ModelLoadError(f"{what} {ref!r} is a file; expected a directory or a Hugging Face id")
    if os.path.isdir(os.path.expanduser(ref)):  # ~/models/x
        return resolve_model_dir(os.path.expanduser(ref), revision, what)
    if looks_like_path(ref):  # a typo in a local path: say so before any hub call
        raise ModelLoadError(missing_path_message(ref, what))
    key = (ref, revision)
    if key in _RESOLVED:
        return _RESOLVED[key]
    try:
        from huggingface_hub import snapshot_download

        _RESOLVED[key] = Path(snapshot_download(ref, revision=revision))
        return _RESOLVED[key]
    except Exception as err:  # offline, gated, or a typo: say which and how to fix it
        raise ModelLoadError(
            f"cannot find {what} {ref!r}: it is not a local directory and downloading it from "
            f"the Hugging Face Hub failed ({type(err).__name__}: {err}). Give a local directory, "
            f"or run once with internet access (and HF_TOKEN for gated models)."
        ) from err


def local_model_dir(ref: str, revision: str | None = None) -> Path | None:
    """A local folder, or the cached snapshot of a hub id (never the network); None if neither."""
    if os.path.isdir(os.path.expanduser(ref)):
        return Path(os.path.expanduser(ref))
    if looks_like_path(ref):
        return None
    if (ref, revision) in _RESOLVED:
        return _RESOLVED[(ref, revision)]
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, revision=revision, local_files_only=True))
    except Exception:
        return None


def _ref_identity(ref: str, revision: str | None, sample: bool) -> dict[str, Any]:
    if os.path.isdir(ref):
        return {"local": True, "content_sha256": dir_identity(Path(ref), sample=sample)}
    # A hub id is what its resolved commit holds: a new commit of an adapter gets a new
    # merge, new logits and new graphs, and a revision name alone identifies nothing.
    try:
        folder = resolve_model_dir(ref, revision)
    except ModelLoadError:
        # Neither cached nor downloadable here: nothing can be computed with it, so this name
        # only labels what is listed (status, reports of results copied from elsewhere).
        return {"local": False, "id": ref, "revision": revision or "main", "resolved": False}
    return {
        "local": False,
        "id": ref,
        "commit": folder.name,
        "content_sha256": dir_identity(folder, sample=sample),
    }


def fingerprint(spec: ModelSpec, device: torch.device | str | None = None) -> str:
    """Hash of base, adapter weights, resolved dtype and transcoders (not the device)."""
    # imported here: the transcoder sources build on this module's ModelLoadError
    from em_circuits.models.transcoder_source import transcoder_identity  # noqa: PLC0415  # cycle: transcoder_source imports this module

    dtype = resolve_dtype(spec.dtype, resolve_device(device))
    identity = {
        "base": _ref_identity(spec.base, spec.base_revision, sample=True),
        "adapter": None
        if spec.adapter is None
        else _ref_identity(spec.adapter, spec.adapter_revision, sample=False),
        "dtype": str(dtype).removeprefix("torch."),
        "transcoders": transcoder_identity(spec.transcoders),
    }
    template = chat_template_sha(spec) if spec.chat_template else None
    if template is not None:  # absent for plain inputs: earlier fingerprints stay valid
        identity["input"] = f"chat-template:{template}"
    blob = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def chat_template_sha(spec: ModelSpec) -> str | None:
    """First 16 hex digits of the sha256 of the base tokenizer's chat template (the merged
    model uses the base's tokenizer); None when it has none or it cannot be read offline."""
    folder = local_model_dir(spec.base, spec.base_revision)
    if folder is None:
        return None
    template = None
    jinja = folder / "chat_template.jinja"
    config = folder / "tokenizer_config.json"
    if jinja.is_file():
        template = jinja.read_text()
    elif config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_slug(spec: ModelSpec, fp: str) -> str:
    """Directory name for a model's artifacts: readable name plus fingerprint prefix."""
    return f"{slugify(spec.display_name)}--{fp[:12]}"


def words_near(spec: ModelSpec) -> Path | None:
    """A words.json next to a local adapter or base (where the toy organism keeps it)."""
    for ref in (spec.adapter, spec.base):
        if not ref or not Path(ref).is_dir():
            continue
        for folder in (Path(ref), Path(ref).parent):
            if (folder / "words.json").is_file():
                return folder / "words.json"
    return None

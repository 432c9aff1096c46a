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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_circuits.core.store import slugify

if TYPE_CHECKING:  # torch is imported where it is used: --help and specs stay fast
    import torch


#: circuit-tracer's preset names and the hub repositories they stand for.
PRESET_REPOS = {
    "llama": "mntss/transcoder-Llama-3.2-1B",
    "gemma": "mwhanna/gemma-scope-transcoders",
}
TRANSCODER_PRESETS = set(PRESET_REPOS)


DTYPES = ("float32", "bfloat16", "float16")


class ModelLoadError(RuntimeError):
    """A model, adapter or transcoder set cannot be loaded as specified."""


class NoLayerFilesError(ModelLoadError):
    """A transcoder config lists no per-layer files (a cross-layer transcoder's hub layout)."""


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


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """The device to run on: ``None`` is :func:`default_device`; a bare ``cuda`` under
    ``accelerate launch`` is this process's own GPU (its local rank), not GPU 0 for all; a
    device this machine lacks is a one-line ModelLoadError."""
    import torch

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
        "content_sha256": _dir_identity(folder, sample=sample),
    }


def _looks_local(ref: str) -> bool:
    """A reference meant as a local path: a config file name, an explicit relative or absolute
    path, or one whose first component exists here (a hub id is ``org/repo[/sub][@rev]``)."""
    if ref.endswith((".yaml", ".yml")) or ref.startswith((".", "/", "~")):
        return True
    return os.path.exists(ref.split("/")[0]) and "/" in ref


def transcoder_config_path(ref: str) -> Path | None:
    """The local transcoder config a reference names (a sparsify set's folder, which has no
    single config), or None for presets and hub refs; a local path in no known format is a
    one-line ModelLoadError.

    The path is made absolute but symlinks are kept: a config inside a Hugging Face snapshot
    is a link into ``blobs/``, and its relative file names mean the snapshot's files.
    """
    path = Path(ref).expanduser()
    if path.exists():
        # imported here: transcoder_formats builds on this module's TranscoderSource
        from em_circuits.models.transcoder_formats import local_transcoders

        return local_transcoders(path).absolute()
    if ref not in TRANSCODER_PRESETS and _looks_local(ref):
        raise ModelLoadError(f"transcoder config {ref!r} does not exist")
    return None


def _hub_file(repo_id: str, filename: str, revision: str | None) -> Path:
    """A file of a hub repository: from the local cache when it is there (no network call
    at all), else downloaded; offline and not cached is a one-line ModelLoadError."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
    except Exception as cached_err:
        if HF_HUB_OFFLINE:
            raise ModelLoadError(
                f"{repo_id}/{filename} is not in the Hugging Face cache and HF_HUB_OFFLINE=1: "
                "download it once with internet access (same HF_HOME), then run offline"
            ) from cached_err
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as err:
        raise ModelLoadError(
            f"cannot get {repo_id}/{filename} from the Hugging Face Hub "
            f"({type(err).__name__}: {err})"
        ) from None


def _file_entry(entry: str, base: Path) -> Path:
    """A transcoder config's file entry: ``hf://org/repo/path[?revision=...]`` from the hub (or
    its cache), anything else relative to the config's folder."""
    if entry.startswith("hf://"):
        from circuit_tracer.utils.hf_utils import parse_hf_uri

        uri = parse_hf_uri(entry)
        return _hub_file(uri.repo_id, str(uri.file_path), uri.revision)
    return base / entry


@dataclass(frozen=True)
class TranscoderSource:
    """A transcoder reference resolved to local files (nothing downloaded twice)."""

    ref: str
    config: dict[str, Any]  # the config, its "transcoders" list replaced by local paths
    config_path: Path  # the config file (a sparsify set: its run config, else its folder)
    files: list[Path]  # the weight file of each layer
    #: Further files that define the set (a sparsify set's per-hookpoint cfg.json), hashed
    #: into its identity.
    config_files: tuple[Path, ...] = ()


_TRANSCODERS: dict[str, TranscoderSource] = {}


def resolve_transcoders(ref: str) -> TranscoderSource:
    """A local config.yaml (or its folder) or sparsify folder, a preset (``llama``,
    ``gemma``) or a hub ref (``org/repo[/subfolder][@revision]``; a circuit-tracer config or
    a sparsify set) as local files, cached files first."""
    import yaml

    from em_circuits.models import transcoder_formats as formats  # builds on this module

    if ref in _TRANSCODERS:
        return _TRANSCODERS[ref]
    config_path = transcoder_config_path(ref)
    from_hub = config_path is None
    if config_path is not None and config_path.is_dir():
        return formats.read_sparsify_set(ref, config_path, scan=config_path.name)
    if config_path is None:
        hub = PRESET_REPOS.get(ref, ref)
        path_part, _, revision = hub.partition("@")
        parts = path_part.split("/")
        if len(parts) < 2:
            raise ModelLoadError(
                f"unknown transcoders {ref!r}: give a local config.yaml or sparsify folder, a "
                f"preset ({', '.join(sorted(TRANSCODER_PRESETS))}) or a hub id "
                "org/repo[/subfolder]"
            )
        repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
        name = f"{subfolder}/config.yaml" if subfolder else "config.yaml"
        try:
            config_path = _hub_file(repo_id, name, revision or None)
        except ModelLoadError:
            # No circuit-tracer config: EleutherAI publishes sparsify folders instead.
            folder = formats.hub_sparsify_folder(repo_id, subfolder, revision or None)
            if folder is None:
                raise
            _TRANSCODERS[ref] = formats.read_sparsify_set(ref, folder, scan=ref)
            return _TRANSCODERS[ref]
    config = yaml.safe_load(config_path.read_text()) or {}
    if from_hub:  # circuit-tracer picks its gemma-scope readers by the repository's name
        config.setdefault("repo_id", repo_id)
    for key in ("model_kind", "feature_input_hook", "feature_output_hook"):
        if key not in config:
            raise ModelLoadError(f"{config_path}: missing '{key}'")
    entries = config.get("transcoders")
    if not entries:
        raise NoLayerFilesError(f"{config_path}: no 'transcoders' list of per-layer files")
    files = [_file_entry(str(entry), config_path.parent) for entry in entries]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ModelLoadError(f"{config_path}: transcoder files not found: {missing}")
    config = {**config, "transcoders": [str(p) for p in files]}
    config.setdefault("scan", ref if from_hub else config_path.parent.name)
    source = TranscoderSource(ref, config, config_path, files)
    if from_hub:  # resolved once per process; a local config is read again (it may change)
        _TRANSCODERS[ref] = source
    return source


def transcoder_identity(ref: str) -> dict[str, Any]:
    """What a transcoder reference holds: its config and file contents (sampled)."""
    if transcoder_config_path(ref) is None:  # a hub ref (a mistyped local path raised)
        try:
            resolve_transcoders(ref)
        except ModelLoadError:  # not cached, no network: a label only, as for models
            return {"local": False, "ref": ref, "resolved": False}
    source = resolve_transcoders(ref)
    digest = hashlib.sha256(
        source.config_path.read_bytes() if source.config_path.is_file() else b""
    )
    for config_file in source.config_files:
        digest.update(config_file.read_bytes())
    for layer_file in source.files:
        digest.update(_sha256_file(layer_file, sample=True).encode())
    return {"local": True, "content_sha256": digest.hexdigest()}


def fingerprint(spec: ModelSpec, device: torch.device | str | None = None) -> str:
    """Hash of base, adapter weights, resolved dtype and transcoders (not the device)."""
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

"""Transcoder references resolved to local files, and their identity.

A reference is a local ``config.yaml`` (or its folder), a sparsify folder, a circuit-tracer
preset (``llama``, ``gemma``) or a hub ref (``org/repo[/subfolder][@revision]``: a
circuit-tracer config or a sparsify set); :func:`resolve_transcoders` makes it a
:class:`TranscoderSource` of local files, from the Hugging Face cache first. The layouts
themselves are read in :mod:`em_circuits.models.transcoder_formats`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from em_circuits.models.content_hash import sha256_file
from em_circuits.models.spec import ModelLoadError

#: circuit-tracer's preset names and the hub repositories they stand for.
PRESET_REPOS = {
    "llama": "mntss/transcoder-Llama-3.2-1B",
    "gemma": "mwhanna/gemma-scope-transcoders",
}
TRANSCODER_PRESETS = set(PRESET_REPOS)


class NoLayerFilesError(ModelLoadError):
    """A transcoder config lists no per-layer files (a cross-layer transcoder's hub layout)."""


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
        from em_circuits.models.transcoder_formats import local_transcoders  # noqa: PLC0415  # cycle: transcoder_formats imports this module

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
    from em_circuits.models import transcoder_formats as formats  # noqa: PLC0415  # cycle: transcoder_formats imports this module

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
        digest.update(sha256_file(layer_file, sample=True).encode())
    return {"local": True, "content_sha256": digest.hexdigest()}

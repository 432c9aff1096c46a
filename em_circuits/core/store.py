"""The results store: one documented layout, atomic writes, validated reads.

Every stage reads and writes through this module, so the layout lives in one place.
Layout under the results root (``results/`` by default)::

    prompts/<prompt_id>.json                        prompt records (text, format, origin)
    logits/<model_slug>/<prompt_id>.json            top-k next-token logits of one model
    verdicts/<adapted_slug>/<prompt_id>.json        judge labels + divergence for a prompt
    judge_cache/<key>.json                          raw judge replies, keyed by their inputs
    queue/<adapted_slug>/<prompt_id>.json           manual labeling queue items (with state)
    labels/<adapted_slug>/<prompt_id>.json          final labels (human or judge-accepted)
    graphs/<model_slug>/<prompt_id>/<params>.*      compact attribution graphs (+ viewer JSON)
    features/<model_slug>/<prompt_id>/<params>.json per-prompt feature effects (analysis cache)
    analysis/                                       cross-prompt tables, plots, causal checks
    cache/merged/<adapted_slug>/                    merged adapter weights, built once
    report.md, report.json                          the end-of-run report

``model_slug`` is ``<readable-name>--<fingerprint[:12]>``, so a person can find a model's files
by name while two different models (or two versions of one adapter) never share a directory.

Every JSON artifact is an envelope::

    {"schema": "<kind>", "schema_version": N, "prompt_id": ..., "model_fingerprint": ...,
     "created": "<UTC ISO time>", ...payload}
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import re
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

#: The artifact kinds and the keys each must carry besides the envelope.
ARTIFACT_KEYS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt_id", "text", "format"),
    "logits": ("prompt_id", "model_fingerprint", "top_k"),
    "verdict": ("prompt_id", "model_fingerprint", "base_fingerprint", "labels", "verdict"),
    "judge_call": ("key", "reply"),
    "queue_item": ("prompt_id", "model_fingerprint", "state"),
    "labels": ("prompt_id", "model_fingerprint", "tokens", "labeled_by"),
    "graph_meta": ("prompt_id", "model_fingerprint", "params_key", "targets"),
    "feature_effects": ("prompt_id", "model_fingerprint", "graph_fingerprint", "features"),
    "table": (),
    "report": (),
    "organism_report": (),
}


class ArtifactError(ValueError):
    """A stored file is missing, unreadable or not what it claims to be."""

    def __init__(self, path: Path | str, problem: str, fix: str | None = None):
        self.path = Path(path)
        self.problem = problem
        message = f"{path}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def prompt_id(text: str, fmt: str) -> str:
    """Content hash of the prompt text and its format: stable across runs and machines.

    The format is part of the key because the same words fed raw and fed through a chat
    template are different inputs to the model.
    """
    digest = hashlib.sha256(f"{fmt}\x00{text}".encode()).hexdigest()
    return digest[:16]


def slugify(name: str) -> str:
    """A file-name-safe, human-readable version of a model name or path."""
    name = re.sub(r"[\\/\s]+", "_", name.strip())
    name = re.sub(r"[^0-9A-Za-z._-]", "", name).strip("._")
    return name[-60:] or "unnamed"


_HOST = socket.gethostname().replace(".", "_")


def _temp_prefix(path: Path) -> str:
    # Host and PID in the name let a later run tell an orphan (writer killed) from a file
    # another live process is still writing, e.g. under accelerate with several processes.
    return f".{path.name}.{_HOST}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphaned_temporaries(root: Path) -> int:
    """Delete temporary files left by writers of this host that were killed mid-write."""
    removed = 0
    for tmp in Path(root).rglob(".*.tmp"):
        parts = tmp.name.split(".")
        try:
            host, pid = parts[-4], int(parts[-3])
        except (IndexError, ValueError):
            continue
        if host == _HOST and not _pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename.

    Rename is atomic on POSIX, so readers (and a later run after Ctrl-C) see either the old
    file or the complete new one, never a prefix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write with any library; it is renamed onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite_json(value: Any) -> Any:
    """NaN/Inf become null: JSON has no such numbers, and jq or a browser can't read them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


#: Test hook: ``KIND[/FILE_NAME]:N`` kills this process with SIGKILL right after the N-th
#: artifact of that kind is written, so crash-and-resume tests stop at the same place on any
#: machine speed. With ``EM_CIRCUITS_CRASH_GROUP=<token>`` it kills every process whose
#: environment carries the same token (a launcher and all its workers: a lost node).
CRASH_AFTER_ENV = "EM_CIRCUITS_CRASH_AFTER"
CRASH_GROUP_ENV = "EM_CIRCUITS_CRASH_GROUP"
_crash_counts: dict[str, int] = {}


def _processes_with_env(entry: bytes) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if entry in environ.split(b"\0"):
            found.append(int(proc.name))
    return found


def _crash_point(path: Path, kind: str) -> None:
    spec = os.environ.get(CRASH_AFTER_ENV)
    if not spec:
        return
    target, _, count = spec.rpartition(":")
    if target not in (kind, f"{kind}/{Path(path).name}"):
        return
    _crash_counts[target] = _crash_counts.get(target, 0) + 1
    if _crash_counts[target] >= int(count):
        token = os.environ.get(CRASH_GROUP_ENV)
        if token:
            for pid in _processes_with_env(f"{CRASH_GROUP_ENV}={token}".encode()):
                if pid != os.getpid():
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def write_artifact(path: Path, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Validate and atomically write one JSON artifact; returns the full envelope."""
    if kind not in ARTIFACT_KEYS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    envelope = {"schema": kind, "schema_version": SCHEMA_VERSION, "created": utc_now()}
    envelope.update(payload)
    missing = [key for key in ARTIFACT_KEYS[kind] if key not in envelope]
    if missing:
        raise ValueError(f"{kind} artifact for {path} lacks {missing}")
    text = json.dumps(_finite_json(envelope), indent=1, ensure_ascii=False, default=_json_default,
                      allow_nan=False)
    atomic_write_text(path, text + "\n")
    _crash_point(path, kind)
    return envelope


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(path, "file not found") from None
    except UnicodeDecodeError as err:
        raise ArtifactError(path, f"not UTF-8 text ({err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ArtifactError(
            path,
            f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}",
            "delete the file to recompute it, or restore it from a backup",
        ) from None


def read_artifact(path: Path, kind: str) -> dict[str, Any]:
    """Read a JSON artifact and check its envelope; raises ArtifactError naming the file."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ArtifactError(path, f"expected a JSON object, found {type(data).__name__}")
    if data.get("schema") != kind:
        found = data.get("schema")
        raise ArtifactError(path, f"expected a {kind!r} artifact, found schema {found!r}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            path,
            f"schema_version {version!r}, this code reads version {SCHEMA_VERSION}",
            "recompute it with --force",
        )
    missing = [key for key in ARTIFACT_KEYS[kind] if key not in data]
    if missing:
        raise ArtifactError(path, f"missing field(s) {', '.join(missing)}")
    return data


class ResultsStore:
    """Paths and typed reads/writes for every artifact under one results root."""

    def __init__(self, root: Path | str = "results"):
        self.root = Path(root)

    # -- paths ---------------------------------------------------------------------------
    def prompt_path(self, pid: str) -> Path:
        return self.root / "prompts" / f"{pid}.json"

    def logits_path(self, model_slug: str, pid: str) -> Path:
        return self.root / "logits" / model_slug / f"{pid}.json"

    def verdict_path(self, adapted_slug: str, pid: str) -> Path:
        return self.root / "verdicts" / adapted_slug / f"{pid}.json"

    def judge_cache_path(self, key: str) -> Path:
        return self.root / "judge_cache" / f"{key}.json"

    def queue_path(self, adapted_slug: str, pid: str) -> Path:
        return self.root / "queue" / adapted_slug / f"{pid}.json"

    def labels_path(self, adapted_slug: str, pid: str) -> Path:
        return self.root / "labels" / adapted_slug / f"{pid}.json"

    def graph_dir(self, model_slug: str, pid: str) -> Path:
        return self.root / "graphs" / model_slug / pid

    def features_path(self, model_slug: str, pid: str, params_key: str) -> Path:
        return self.root / "features" / model_slug / pid / f"{params_key}.json"

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    @property
    def merged_cache_dir(self) -> Path:
        return self.root / "cache" / "merged"

    # -- prompts ---------------------------------------------------------------------------
    def save_prompt(self, record: dict[str, Any]) -> dict[str, Any]:
        """Store a prompt record; its id is derived from text and format, never trusted."""
        pid = prompt_id(record["text"], record["format"])
        record = {**record, "prompt_id": pid}
        return write_artifact(self.prompt_path(pid), "prompt", record)

    def load_prompt(self, pid: str) -> dict[str, Any]:
        path = self.prompt_path(pid)
        data = read_artifact(path, "prompt")
        if prompt_id(data["text"], data["format"]) != pid:
            raise ArtifactError(path, "prompt_id does not match the hash of its text and format")
        return data

    def prompt_ids(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "prompts").glob("*.json"))

    def iter_prompts(self) -> Iterator[dict[str, Any]]:
        for pid in self.prompt_ids():
            yield self.load_prompt(pid)

    # -- fingerprinted artifacts ------------------------------------------------------------
    def load_for_model(
        self, path: Path, kind: str, fingerprint: str, **expected: Any
    ) -> dict[str, Any] | None:
        """Read an artifact if it exists and was made by ``fingerprint``; else None (cache miss).

        Extra keyword arguments must also match (e.g. ``params_key``), so a cached artifact
        computed with other parameters is a miss, never silently reused.
        """
        if not Path(path).exists():
            return None
        data = read_artifact(path, kind)
        if data.get("model_fingerprint") != fingerprint:
            return None
        for key, value in expected.items():
            if data.get(key) != value:
                return None
        return data


def params_key(params: dict[str, Any]) -> str:
    """A short stable hash of a parameter dict, used in cache file names."""
    blob = json.dumps(params, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:12]

"""JSON artifacts: the envelope every stored record is written in, validated on the way out and
on the way back in, and the errors that name a broken file with its fix.

Every JSON artifact is an envelope whose fields are typed in :mod:`em_circuits.core.schemas`::

    {"schema": "<kind>", "schema_version": N, "prompt_id": ..., "model_fingerprint": ...,
     "created": "<UTC ISO time>", ...payload}

Where each artifact lives is :class:`em_circuits.core.store.ResultsStore`'s business.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, overload

from em_circuits.core.atomic import atomic_write_text, crash_point
from em_circuits.core.identifiers import json_default
from em_circuits.core.record_checks import record_problems
from em_circuits.core.schemas import (
    ARTIFACT_KEYS,
    FeatureEffectsRecord,
    GraphMetaRecord,
    JudgeCallRecord,
    LabelsRecord,
    LogitsRecord,
    PromptRecord,
    QueueItemRecord,
    VerdictRecord,
)

SCHEMA_VERSION = 1

#: The fix offered for a broken file that a stage computes: another run makes it again.
_RECOMPUTE = "delete the file to recompute it (or rerun with --force), or restore it from a backup"

#: The fix for broken files that no run can make again: deleting them loses work of a person.
_RESTORE: dict[str, str] = {
    "labels": "restore it from a backup, or re-import the labels with `em-circuits label "
    "--import FILE`; labels cannot be recomputed (a person made them), so do not delete it",
    "queue_item": "restore it from a backup, or move it out of the queue folder to queue the "
    "prompt afresh; deleting it throws away the item's labeling history",
    "prompt": "restore it from a backup, or delete the file and import the prompt again "
    "(`em-circuits prompts --import FILE`); a run without it generates another prompt, not this "
    "one",
}


def fix_for(kind: str | None) -> str:
    """How to repair a broken ``kind`` artifact: recompute it, or restore it when no run can."""
    if kind in _RESTORE:
        return _RESTORE[kind]
    return _RECOMPUTE


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


def _finite_json(value: Any) -> Any:
    """NaN/Inf become null: JSON has no such numbers, and jq or a browser can't read them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


# The record of each kind reaches the caller typed (a "table" stays free-form).
@overload
def write_artifact(
    path: Path, kind: Literal["prompt"], payload: Mapping[str, Any]
) -> PromptRecord: ...
@overload
def write_artifact(
    path: Path, kind: Literal["logits"], payload: Mapping[str, Any]
) -> LogitsRecord: ...
@overload
def write_artifact(
    path: Path, kind: Literal["verdict"], payload: Mapping[str, Any]
) -> VerdictRecord: ...
@overload
def write_artifact(
    path: Path, kind: Literal["judge_call"], payload: Mapping[str, Any]
) -> JudgeCallRecord: ...
@overload
def write_artifact(
    path: Path, kind: Literal["queue_item"], payload: Mapping[str, Any]
) -> QueueItemRecord: ...
@overload
def write_artifact(
    path: Path, kind: Literal["labels"], payload: Mapping[str, Any]
) -> LabelsRecord: ...
@overload
def write_artifact(
    path: Path, kind: Literal["graph_meta"], payload: Mapping[str, Any]
) -> GraphMetaRecord: ...
@overload
def write_artifact(
    path: Path, kind: Literal["feature_effects"], payload: Mapping[str, Any]
) -> FeatureEffectsRecord: ...
@overload
def write_artifact(path: Path, kind: str, payload: Mapping[str, Any]) -> Any: ...


def write_artifact(path: Path, kind: str, payload: Mapping[str, Any]) -> Any:
    """Validate and atomically write one JSON artifact; returns the full envelope (the record
    of ``kind``, as :func:`read_artifact` would return it).

    The same record check as :func:`read_artifact` runs first, so a file this writes can
    always be read back.
    """
    if kind not in ARTIFACT_KEYS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    envelope = {"schema": kind, "schema_version": SCHEMA_VERSION, "created": utc_now()}
    envelope.update(payload)
    missing = [key for key in ARTIFACT_KEYS[kind] if key not in envelope]
    if missing:
        raise ValueError(f"{kind} artifact for {path} lacks {missing}")
    data = _finite_json(envelope)
    problems = record_problems(kind, data)
    if problems:
        raise ValueError(f"{kind} artifact for {path}: {'; '.join(problems)}")
    text = json.dumps(data, indent=1, ensure_ascii=False, default=json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")
    crash_point(path, kind)
    return envelope


def read_json(path: Path, kind: str | None = None) -> Any:
    """The parsed JSON at ``path``; ArtifactError naming the file and, for a ``kind`` artifact,
    the fix that suits that kind (see :func:`fix_for`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(path, "file not found") from None
    except UnicodeDecodeError as err:
        raise ArtifactError(path, f"not UTF-8 text ({err})") from None

    def non_finite(constant: str) -> Any:
        # Every artifact is written with NaN as null: a NaN/Infinity here was not written by
        # this tool, and read as a number it would silently change statistics downstream.
        raise ArtifactError(path, f"contains the non-finite number {constant}", fix_for(kind))

    try:
        return json.loads(text, parse_constant=non_finite)
    except json.JSONDecodeError as err:
        raise ArtifactError(
            path,
            f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}",
            fix_for(kind),
        ) from None


@overload
def read_artifact(path: Path, kind: Literal["prompt"]) -> PromptRecord: ...
@overload
def read_artifact(path: Path, kind: Literal["logits"]) -> LogitsRecord: ...
@overload
def read_artifact(path: Path, kind: Literal["verdict"]) -> VerdictRecord: ...
@overload
def read_artifact(path: Path, kind: Literal["judge_call"]) -> JudgeCallRecord: ...
@overload
def read_artifact(path: Path, kind: Literal["queue_item"]) -> QueueItemRecord: ...
@overload
def read_artifact(path: Path, kind: Literal["labels"]) -> LabelsRecord: ...
@overload
def read_artifact(path: Path, kind: Literal["graph_meta"]) -> GraphMetaRecord: ...
@overload
def read_artifact(path: Path, kind: Literal["feature_effects"]) -> FeatureEffectsRecord: ...
@overload
def read_artifact(path: Path, kind: str) -> Any: ...


def read_artifact(path: Path, kind: str) -> Any:
    """Read a JSON artifact and check it against its record (:mod:`em_circuits.core.schemas`);
    returns that record (``LabelsRecord`` for kind "labels", and so on).

    Raises ArtifactError naming the file, what is wrong and how to fix it: wrong kind, another
    schema version, a missing required field, or a required field of the wrong basic type.
    """
    data = read_json(path, kind)
    if not isinstance(data, dict):
        raise ArtifactError(
            path, f"expected a JSON object, found {type(data).__name__}", fix_for(kind)
        )
    if data.get("schema") != kind:
        found = data.get("schema")
        raise ArtifactError(
            path,
            f"expected a {kind!r} artifact, found schema {found!r}",
            "check the path: this file belongs to another stage",
        )
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            path,
            f"schema_version {version!r}, this code reads version {SCHEMA_VERSION}",
            "recompute it with --force" if kind not in _RESTORE else fix_for(kind),
        )
    problems = record_problems(kind, data)
    if problems:
        raise ArtifactError(path, "; ".join(problems), fix_for(kind))
    return data

"""The viewer folder's names and listing: the roles, a graph's slug, the node types of its
graph files, and ``graph-metadata.json`` (read, and upserted under a lock)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from em_circuits.core.atomic import atomic_write_text

ROLES = ("base", "adapted")


METADATA_FILE = "graph-metadata.json"


#: circuit-tracer's node type of a transcoder feature in its frontend graphs.
FEATURE_NODE = "cross layer transcoder"


_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ViewerError(RuntimeError):
    """The viewer cannot write or serve graphs (bad name, missing assets, port in use)."""


def viewer_slug(prompt_id: str, role: str) -> str:
    """Name of a prompt's graph in the viewer: ``<prompt_id>--<role>``."""
    if role not in ROLES:
        raise ViewerError(f"role must be one of {ROLES}, got {role!r}")
    # The slug becomes a file name and a URL path segment, so keep it to plain characters.
    if not _SAFE_ID.match(prompt_id):
        raise ViewerError(f"prompt id {prompt_id!r} must match {_SAFE_ID.pattern}")
    return f"{prompt_id}--{role}"


def node_feature(node: Mapping[str, Any]) -> tuple[int, int]:
    """(layer, transcoder feature id) of a feature node (its ``node_id`` is layer_feature_pos;
    its ``feature`` field is circuit-tracer's pairing of the two)."""
    layer, feature = node["node_id"].split("_")[:2]
    return int(layer), int(feature)


def upsert_metadata(viewer_dir: Path, entry: dict[str, Any]) -> None:
    """Insert or replace ``entry`` (by slug) in ``graph-metadata.json``, atomically.

    Entries are kept sorted by prompt and role so the frontend's default graph and selectors
    are stable across runs.
    """
    viewer_dir = Path(viewer_dir)
    with metadata_locked(viewer_dir):
        graphs = [g for g in read_metadata(viewer_dir) if g.get("slug") != entry["slug"]]
        graphs.append(entry)
        graphs.sort(key=_metadata_order)
        atomic_write_text(viewer_dir / METADATA_FILE, json.dumps({"graphs": graphs}, indent=1))


def read_metadata(viewer_dir: Path) -> list[dict[str, Any]]:
    """The entries of ``graph-metadata.json`` (empty if the directory has no graphs yet)."""
    path = Path(viewer_dir) / METADATA_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text())["graphs"]


def _metadata_order(entry: dict[str, Any]) -> tuple[str, int, str]:
    role = entry.get("role")
    return (entry.get("prompt_id", ""), ROLES.index(role) if role in ROLES else 9, entry["slug"])


@contextlib.contextmanager
def metadata_locked(viewer_dir: Path) -> Iterator[None]:
    """While open, no other process writes ``viewer_dir``'s graph metadata or graph files."""
    # An advisory lock: several graph writers (processes) may share one viewer directory.
    with open(Path(viewer_dir) / f".{METADATA_FILE}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

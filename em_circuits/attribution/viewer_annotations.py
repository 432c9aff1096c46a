"""What the analysis adds to the viewer's graphs: feature records for the feature panel, the
labels in the feature nodes' names, and ``analysis.json`` (top features, base-vs-adapted
categories) for the side-by-side page."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from em_circuits.attribution.viewer_metadata import (
    FEATURE_NODE,
    ROLES,
    metadata_locked,
    node_feature,
    read_metadata,
)
from em_circuits.core.atomic import atomic_write_text
from em_circuits.core.naming import feature_name

#: The side-by-side page reads the analysis's top features and categories from this file.
ANALYSIS_FILE = "analysis.json"


def features_in_viewer(viewer_dir: Path) -> dict[str, set[tuple[int, int]]]:
    """{role: {(layer, feature)}} of the feature nodes drawn in the viewer's graphs."""
    found: dict[str, set[tuple[int, int]]] = {role: set() for role in ROLES}
    for entry in read_metadata(viewer_dir):
        path = Path(viewer_dir) / f"{entry['slug']}.json"
        if entry.get("role") not in ROLES or not path.is_file():
            continue
        for node in json.loads(path.read_text())["nodes"]:
            if node["feature_type"] == FEATURE_NODE:
                found[entry["role"]].add(node_feature(node))
    return found


def feature_records_dir(viewer_dir: Path, role: str) -> Path:
    """Where the feature panel's records of ``role`` live: ``features/<role>/<cantor>.json``,
    fetched by the frontend as ``./data/features/<role>/<cantor>.json``."""
    return Path(viewer_dir) / "features" / role


def write_feature_records(
    viewer_dir: Path, role: str, records: Mapping[tuple[int, int], Mapping[str, Any]]
) -> int:
    """Write each record (circuit-tracer's feature format, see interpret.frontend) as
    ``<cantor index>.json``; returns how many."""
    folder = feature_records_dir(viewer_dir, role)
    folder.mkdir(parents=True, exist_ok=True)
    for record in records.values():
        atomic_write_text(folder / f"{int(record['index'])}.json", json.dumps(record))
    return len(records)


def annotate_graphs(
    viewer_dir: Path,
    labels: Mapping[tuple[int, int], str | None],
    analysis: Mapping[str, Any],
) -> None:
    """Point each graph's feature panel at the local records, put labels into the feature
    nodes' names, and write ``analysis.json`` (the analysis's top features and each compared
    feature's base-vs-adapted category) for the side-by-side page.

    A graph keeps its transcoder set's name as ``metadata.source_scan``; ``scan`` becomes the
    local folder, which the frontend reads without asking a hosted feature store.
    """
    viewer_dir = Path(viewer_dir)
    with metadata_locked(viewer_dir):
        for entry in read_metadata(viewer_dir):
            role = entry.get("role")
            path = viewer_dir / f"{entry['slug']}.json"
            if role not in ROLES or not path.is_file():
                continue
            data = json.loads(path.read_text())
            meta = data["metadata"]
            if feature_records_dir(viewer_dir, role).is_dir():
                meta.setdefault("source_scan", meta.get("scan"))
                meta["scan"] = f"./data/features/{role}"
            for node in data["nodes"]:
                if node["feature_type"] != FEATURE_NODE:
                    continue
                label = labels.get(node_feature(node))
                name = feature_name(*node_feature(node))
                node["clerp"] = f"{name}: {label}" if label else name
            atomic_write_text(path, json.dumps(data))
        atomic_write_text(viewer_dir / ANALYSIS_FILE, json.dumps(analysis, indent=1))

"""Graph viewer: one attribution graph written in circuit-tracer's frontend format.

``write_viewer_graph()`` writes a graph (``<slug>.json`` plus its entry in
``graph-metadata.json``) into a viewer directory, its targets named and the adapter's nodes
drawn in. The folder's listing is :mod:`~em_circuits.attribution.viewer_metadata`'s; what the
analysis adds, :mod:`~em_circuits.attribution.viewer_annotations`'s. ``viewer_server`` serves
the folder on 127.0.0.1 by default: ``/compare.html?prompt=<id>`` shows a prompt's base and
adapted graphs side by side, with a selector over all prompts; ``/index.html?slug=<slug>`` is
circuit-tracer's single-graph page. The frontend is served from an offline copy
(``viewer_frontend.build_frontend``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_circuits.attribution.viewer_adapter_nodes import add_adapter_nodes
from em_circuits.attribution.viewer_metadata import (
    FEATURE_NODE,
    METADATA_FILE,
    node_feature,
    upsert_metadata,
    viewer_slug,
)
from em_circuits.core.atomic import apply_default_modes, crash_point, make_temp_dir
from em_circuits.core.naming import feature_name

if TYPE_CHECKING:
    from circuit_tracer import Graph

    from em_circuits.attribution.adapter_nodes import AdapterDetail


def write_viewer_graph(
    graph: Graph,
    viewer_dir: Path,
    prompt_id: str,
    role: str,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    scan: str | None = None,
    targets: Sequence[Mapping[str, Any]] | None = None,
    adapter_graph: AdapterDetail | None = None,
) -> Path:
    """Write ``graph`` as the ``role`` graph of ``prompt_id``; returns the graph's JSON path.

    Uses circuit-tracer's ``create_graph_files`` (pruning with the given thresholds) in a
    scratch directory, then moves the graph file into place and upserts its metadata entry
    under a lock, so concurrent writers and a viewer reading meanwhile never see partial
    files. The caller's graph object is left untouched (circuit-tracer moves the graph it is
    given between devices). ``scan`` defaults to ``graph.scan`` (the transcoder set's name).
    The page opens with the graph's first logit target selected.

    ``targets`` (the stored graph's target table: ``name``, ``kind``, ``label``, ``prob``,
    ``value`` per logit target, in order) makes the targets readable: the contrast is named as
    such with its value and the evil tokens' probability, token targets carry their label and
    true probability, and only the most probable :data:`TOKENS_SHOWN` evil and safe tokens
    are drawn (all stay in the stored graph). Feature nodes are named ``L3 #1234``.

    ``adapter_graph`` (the adapter nodes of a totals graph of the same prompt) adds the adapter
    nodes with the largest total effects on the contrast as nodes of type
    :data:`ADAPTER_NODE` (:func:`add_adapter_nodes`).
    """
    from circuit_tracer.utils.create_graph_files import create_graph_files

    slug = viewer_slug(prompt_id, role)
    viewer_dir = Path(viewer_dir)
    viewer_dir.mkdir(parents=True, exist_ok=True)
    scan = scan or _scan_name(graph)
    target = viewer_dir / f"{slug}.json"
    # Named with host and PID, so that a run after a kill -9 here removes it.
    scratch = make_temp_dir(target)
    try:
        # A shallow copy: create_graph_files reassigns the tensors it moves, on the copy only.
        create_graph_files(
            copy.copy(graph),
            slug,
            str(scratch),
            scan=scan,
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
        )
        entry = _metadata_entry(scratch, slug)
        written = scratch / f"{slug}.json"
        data = json.loads(written.read_text())
        _name_nodes(data, targets)
        if adapter_graph is not None:
            add_adapter_nodes(data, adapter_graph)
        _preselect_first_target(data)
        written.write_text(json.dumps(data))
        apply_default_modes(scratch / f"{slug}.json")
        crash_point(target, "viewer_graph")
        os.replace(scratch / f"{slug}.json", target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    entry.update(
        prompt_id=prompt_id, role=role, title_prefix=f"[{role}]", edge_threshold=edge_threshold
    )
    upsert_metadata(viewer_dir, entry)
    return target


#: Token targets drawn per label (evil, safe) in the viewer, the most probable first: more
#: labels than this overlap at the last position.
TOKENS_SHOWN = 2


_LOGIT_CLERP = re.compile(r'^Output "(.*)" \(p=[^)]*\)$', re.S)


def _name_nodes(data: dict[str, Any], targets: Sequence[Mapping[str, Any]] | None) -> None:
    """Feature nodes get the tool's one feature name; with ``targets``, logit nodes get
    readable names and only the contrast and the top evil and safe tokens are kept."""
    for node in data["nodes"]:
        if node["feature_type"] == FEATURE_NODE and not node.get("clerp"):
            node["clerp"] = feature_name(*node_feature(node))
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    names = [_LOGIT_CLERP.match(n.get("clerp") or "") for n in logits]
    if (
        targets is not None
        and len(targets) == len(logits)
        and [m.group(1) if m else None for m in names] == [str(t["name"]) for t in targets]
    ):
        drop = set()
        shown = {"evil": 0, "safe": 0}
        order = sorted(range(len(targets)), key=lambda i: -float(targets[i].get("prob") or 0))
        for i in order:
            target, node = targets[i], logits[i]
            label = str(target.get("label"))
            prob = float(target.get("prob") or 0.0)
            if target.get("kind") == "contrast":
                # The frontend reads the name between the quotes and the number after "(p=".
                # p: the evil tokens' total probability; then the contrast's value.
                node["clerp"] = (
                    f'Output "evil − safe" (p={prob:.3f}) {float(target.get("value") or 0):+.2f}'
                )
                continue
            shown[label] = shown.get(label, 0) + 1
            if shown[label] > TOKENS_SHOWN:
                drop.add(node["node_id"])
                continue
            node["clerp"] = f'Output "{target["name"]}" (p={prob:.3f}) {label}'
        data["nodes"] = [n for n in data["nodes"] if n["node_id"] not in drop]
        data["links"] = [
            link
            for link in data["links"]
            if link["source"] not in drop and link["target"] not in drop
        ]
        data["metadata"]["targets_not_drawn"] = len(drop)


def _preselect_first_target(data: dict[str, Any]) -> None:
    """Open the graph with its first logit target clicked, its direct inputs highlighted.

    circuit-tracer's frontend means to do this itself but looks for a flag its graphs do not
    carry, so both panes would open with nothing selected. The pipeline's first target is the
    evil-vs-safe contrast, the node to compare across base and adapted.
    """
    first = next((n for n in data["nodes"] if n.get("is_target_logit")), None)
    if first is not None:
        data["qParams"]["clickedId"] = first["node_id"]


def _scan_name(graph: Graph) -> str:
    scan = getattr(graph, "scan", None)
    if isinstance(scan, str) and scan:
        return scan
    if isinstance(scan, list) and scan:
        return "custom-" + "-".join(Path(p).stem for p in scan)[:80]
    return "local"


def _metadata_entry(scratch: Path, slug: str) -> dict[str, Any]:
    graphs = json.loads((scratch / METADATA_FILE).read_text())["graphs"]
    return next(g for g in graphs if g["slug"] == slug)

"""Graph viewer: circuit-tracer's frontend, served offline, base and adapted graphs side by side.

* ``write_viewer_graph()`` writes one attribution graph in circuit-tracer's frontend format
  (``<slug>.json`` plus its entry in ``graph-metadata.json``) into a viewer directory.
* ``start_viewer()`` / ``serve_forever()`` serve that directory with circuit-tracer's request
  handler on 127.0.0.1 by default. ``/compare.html?prompt=<id>`` shows a prompt's base and adapted
  graphs side by side, with a selector over all prompts; ``/index.html?slug=<slug>`` is
  circuit-tracer's single-graph page.

The frontend is served from an offline copy (``viewer_frontend.build_frontend``).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_circuits.attribution.viewer_frontend import (  # noqa: F401  (re-exported)
    ASSETS_DIR,
    VENDOR_DIR,
    VENDOR_FILES,
    build_frontend,
)
from em_circuits.core.atomic import apply_default_modes, crash_point, make_temp_dir
from em_circuits.core.store import atomic_write_text

log = logging.getLogger(__name__)


if TYPE_CHECKING:
    from circuit_tracer import Graph

    from em_circuits.attribution.adapter_nodes import AdapterDetail


ROLES = ("base", "adapted")


METADATA_FILE = "graph-metadata.json"


#: circuit-tracer's node type of a transcoder feature in its frontend graphs.
FEATURE_NODE = "cross layer transcoder"

#: The node type of an adapter node (attribution.adapter_nodes) in the adapted graphs.
ADAPTER_NODE = "lora adapter"

#: Adapter nodes drawn per graph: those with the largest total effects on the contrast.
ADAPTER_NODES_SHOWN = 8

#: Strongest links into and out of each drawn adapter node to features and embeddings (its
#: links to the logit targets are all drawn).
ADAPTER_LINKS_SHOWN = 10


_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


#: Where ``em-circuits serve`` listens by default; the report's links point here.
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


def node_feature(node: Mapping[str, Any]) -> tuple[int, int]:
    """(layer, transcoder feature id) of a feature node (its ``node_id`` is layer_feature_pos;
    its ``feature`` field is circuit-tracer's pairing of the two)."""
    layer, feature = node["node_id"].split("_")[:2]
    return int(layer), int(feature)


def _name_nodes(data: dict[str, Any], targets: Sequence[Mapping[str, Any]] | None) -> None:
    """Feature nodes get the tool's one feature name; with ``targets``, logit nodes get
    readable names and only the contrast and the top evil and safe tokens are kept."""
    from em_circuits.core.naming import feature_name

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


def adapter_node_name(layer: int, module: str, component: int) -> str:
    """The one name of an adapter component: ``LoRA L2 down_proj #0``."""
    return f"LoRA L{int(layer)} {module} #{int(component)}"


def add_adapter_nodes(
    data: dict[str, Any], adapter: AdapterDetail, shown: int = ADAPTER_NODES_SHOWN
) -> int:
    """Draw ``adapter``'s adapter nodes with the largest total effects on its contrast into
    the frontend graph ``data`` of the same prompt, as nodes of type :data:`ADAPTER_NODE` at
    their layer and position, linked to the drawn logit targets (their direct effects), to
    the drawn features they write into (their edges into those features' pre-activations)
    and from the drawn features and token embeddings they read (for the nodes whose reads
    were computed). The effects come from the totals graph with adapter nodes, where the
    adapter's writes are taken out of the errors and attention; the graph's other edges are
    those of the graph drawn. Returns how many were drawn."""
    if "contrast" not in adapter.target_kinds or not len(adapter.nodes):
        return 0
    contrast = adapter.target_kinds.index("contrast")
    modules = adapter.modules
    strength = adapter.total[contrast].abs()
    chosen = [int(i) for i in strength.argsort(descending=True)[:shown] if strength[i] > 0]
    nodes = data["nodes"]
    drawn_features = {
        (int(n["layer"]), node_feature(n)[1], int(n["ctx_idx"])): n["node_id"]
        for n in nodes
        if n["feature_type"] == FEATURE_NODE
    }
    embeddings = {
        int(n["ctx_idx"]): n["node_id"] for n in nodes if n["feature_type"] == "embedding"
    }
    logits = _logit_nodes(nodes, adapter)
    feature_index = {
        (layer, feature, pos): i
        for i, (layer, pos, feature) in enumerate(adapter.features.tolist())
    }
    edge_rows = _positions(adapter.edge_features)  # feature index -> row of the edges
    read_rows = _positions(adapter.read_nodes)  # adapter node -> row of the reads
    links = data["links"]
    n_pos = len(data["metadata"].get("prompt_tokens") or []) or adapter.n_pos
    token_start = adapter.n_sources - adapter.n_pos
    for i in chosen:
        layer, code, component, pos = (int(v) for v in adapter.nodes[i].tolist())
        module = modules[code] if code < len(modules) else str(code)
        node_id = f"A{layer}_{code * 10_000 + component}_{pos}"
        nodes.append(
            {
                "node_id": node_id,
                "feature": -2 - i,
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": ADAPTER_NODE,
                "token_prob": 0.0,
                "is_target_logit": False,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "jsNodeId": f"A{layer}_{code * 10_000 + component}-{n_pos - pos}",
                "clerp": f"{adapter_node_name(layer, module, component)} "
                f"(total {float(adapter.total[contrast, i]):+.2f} on evil − safe)",
                "influence": 0.0,
                "activation": float(adapter.activations[i]),
            }
        )
        for row, logit_id in logits.items():
            links.append(_link(node_id, logit_id, adapter.direct[row, i]))
        writes, reads = [], []
        if adapter.edges is not None:
            for (f_layer, feature, f_pos), feature_id in drawn_features.items():
                k = edge_rows.get(feature_index.get((f_layer, feature, f_pos), -1))
                if k is not None:
                    writes.append(_link(node_id, feature_id, adapter.edges[k, i]))
        r = read_rows.get(i)
        if r is not None and adapter.reads is not None:
            row_reads = adapter.reads[r]
            for (f_layer, feature, f_pos), feature_id in drawn_features.items():
                index = feature_index.get((f_layer, feature, f_pos))
                if index is not None:
                    reads.append(_link(feature_id, node_id, row_reads[index]))
            for e_pos, embedding_id in embeddings.items():
                reads.append(_link(embedding_id, node_id, row_reads[token_start + e_pos]))
        links += _strongest(writes) + _strongest(reads)
    data["links"] = [link for link in links if link is not None]
    data["metadata"]["adapter_nodes"] = {
        "drawn": len(chosen),
        "of": len(adapter.nodes),
        "source": "totals graph of the same prompt with adapter nodes",
    }
    return len(chosen)


def _positions(index: Any) -> dict[int, int]:
    """{value: its position} of a 1-D index tensor (empty for None)."""
    return {} if index is None else {int(v): k for k, v in enumerate(index.tolist())}


def _strongest(links: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The :data:`ADAPTER_LINKS_SHOWN` links of largest absolute weight."""
    kept = [link for link in links if link is not None]
    return sorted(kept, key=lambda link: -abs(link["weight"]))[:ADAPTER_LINKS_SHOWN]


def _link(source: str, target: str, weight: Any) -> dict[str, Any] | None:
    value = float(weight)
    return {"source": source, "target": target, "weight": value} if value != 0 else None


def _logit_nodes(nodes: list[dict[str, Any]], adapter: AdapterDetail) -> dict[int, str]:
    """Target row -> drawn logit node id: the contrast by its name, tokens by their id."""
    out = {}
    for row, (kind, token) in enumerate(zip(adapter.target_kinds, adapter.target_token_ids)):
        for node in nodes:
            if node["feature_type"] != "logit":
                continue
            if kind == "contrast" and "evil − safe" in (node.get("clerp") or ""):
                out[row] = node["node_id"]
            elif kind == "token" and int(node["feature"]) == int(token):
                out[row] = node["node_id"]
    return out


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


def upsert_metadata(viewer_dir: Path, entry: dict[str, Any]) -> None:
    """Insert or replace ``entry`` (by slug) in ``graph-metadata.json``, atomically.

    Entries are kept sorted by prompt and role so the frontend's default graph and selectors
    are stable across runs.
    """
    viewer_dir = Path(viewer_dir)
    with _locked(viewer_dir / f".{METADATA_FILE}.lock"):
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
def _locked(lock_path: Path) -> Iterator[None]:
    # An advisory lock: several graph writers (processes) may share one viewer directory.
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- what the analysis adds: feature records, labels, base-vs-adapted categories ----------------
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
    from em_circuits.core.naming import feature_name

    viewer_dir = Path(viewer_dir)
    with _locked(viewer_dir / f".{METADATA_FILE}.lock"):
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

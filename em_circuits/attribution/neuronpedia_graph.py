"""One viewer graph as Neuronpedia's attribution-graph JSON (circuit-tracer's frontend format
plus the metadata Neuronpedia reads), checked against circuit-tracer's pydantic models, with
the feature files its nodes name (:func:`load_export_graph`)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from em_circuits.attribution.export_features import feature_files
from em_circuits.attribution.export_json import (
    ExportError,
    dumps_json,
    first_error,
    read_json,
)
from em_circuits.attribution.viewer_adapter_nodes import ADAPTER_NODE
from em_circuits.core.version import __version__

log = logging.getLogger(__name__)

#: Neuronpedia refuses a scan or slug with other characters (its upload route's check).
NEURONPEDIA_ID = re.compile(r"^[A-Za-z0-9_.-]+$")

#: Neuronpedia's largest graph upload (its webapp's and Python client's limit).
NEURONPEDIA_MAX_BYTES = 100 * 1024 * 1024

CIRCUIT_TRACER_URL = "https://github.com/decoderesearch/circuit-tracer"

#: Who made the graph, when the user does not say; Neuronpedia's own graphs use the same form.
DEFAULT_CREATOR = "Anonymous (em-circuits)"

#: Metadata keys Neuronpedia shows as generation and pruning settings (names from
#: circuit-tracer's ``attribute()`` and ``prune_graph()``).
GENERATION_KEYS = ("max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes")
PRUNING_KEYS = ("node_threshold", "edge_threshold")


_LOGIT_PROB = re.compile(r"\(p=[-+0-9.eE]+\)")


@dataclass(frozen=True)
class ExportOptions:
    """What the export writes into each graph's metadata besides what the viewer stored.

    ``model_id`` replaces ``scan`` with a Neuronpedia model id (Neuronpedia files an upload
    under the model its scan names, and refuses one it does not host); the transcoder set
    stays in ``info.transcoder_set``. ``feature_url`` is where ``features/`` will be served
    from (public, with CORS): Neuronpedia then fetches ``<url>/features/<role>/<feature>.json``.
    """

    model_id: str | None = None
    feature_url: str | None = None
    creator_name: str = DEFAULT_CREATOR
    creator_url: str | None = None

    def __post_init__(self) -> None:
        if self.model_id is not None and not NEURONPEDIA_ID.match(self.model_id):
            raise ExportError(
                f"Neuronpedia model id {self.model_id!r} must match {NEURONPEDIA_ID.pattern}"
            )
        if self.feature_url is not None and not re.match(r"^https?://", self.feature_url):
            raise ExportError(f"feature URL {self.feature_url!r} must start with http(s)://")


@dataclass
class ExportGraph:
    """One graph ready to write: its JSON text and its feature files' texts, by index."""

    slug: str
    entry: dict[str, Any]
    data: dict[str, Any]
    text: str
    features: dict[int, str]
    adapter_nodes: int = 0  # left out: Neuronpedia has no node type for them
    adapter_links: int = 0


def load_export_graph(
    viewer_dir: Path, entry: dict[str, Any], options: ExportOptions
) -> ExportGraph:
    slug, role = str(entry["slug"]), str(entry["role"])
    path = viewer_dir / f"{slug}.json"
    data = read_json(path)
    try:
        metadata = dict(data["metadata"])
        nodes = data["nodes"]
    except (KeyError, TypeError) as err:
        raise ExportError(f"{path}: not a circuit-tracer graph (no {err})") from err
    local_scan = str(metadata.get("scan", ""))
    # Adapter nodes are this tool's own node type, which Neuronpedia does not know.
    adapter_ids = {n.get("node_id") for n in nodes if n.get("feature_type") == ADAPTER_NODE}
    metadata.pop("adapter_nodes", None)
    links = data.get("links") or []
    kept_links = [
        link
        for link in links
        if link.get("source") not in adapter_ids and link.get("target") not in adapter_ids
    ]
    graph = {
        "metadata": _metadata(metadata, entry, role, path, options),
        "qParams": data.get("qParams"),
        "nodes": [_node(n, path) for n in nodes if n.get("node_id") not in adapter_ids],
        "links": kept_links,
    }
    _validate_graph(graph, path)
    features = feature_files(viewer_dir, local_scan, role, graph["nodes"])
    text = dumps_json(graph, path)
    if len(text.encode("utf-8")) > NEURONPEDIA_MAX_BYTES:
        log.warning("%s: over Neuronpedia's %d MB upload limit", path, NEURONPEDIA_MAX_BYTES >> 20)
    return ExportGraph(
        slug, entry, graph, text, features, len(adapter_ids), len(links) - len(kept_links)
    )


def _metadata(
    metadata: dict[str, Any],
    entry: dict[str, Any],
    role: str,
    path: Path,
    options: ExportOptions,
) -> dict[str, Any]:
    # The viewer points scan at its local feature files ("./data/features/<role>") and keeps
    # the transcoder set in source_scan; shared graphs name the transcoder set again.
    source = str(metadata.pop("source_scan", None) or metadata.get("scan", ""))
    if not source or source.startswith("./"):
        raise ExportError(f"{path}: scan {source!r} names no transcoder set (no source_scan)")
    metadata["scan"] = options.model_id or source

    info: dict[str, Any] = {
        "description": (
            f"{role} model's attribution graph of prompt {entry.get('prompt_id')} "
            f"({path.parent.name}), from em-circuits"
        ),
        "creator_name": options.creator_name,
        "transcoder_set": source,
        "generator": _generator(),
        "create_time_ms": int(path.stat().st_mtime * 1000),
    }
    if options.creator_url:
        info["creator_url"] = options.creator_url
    if _is_hub_id(source):
        info["source_urls"] = [f"https://huggingface.co/{source}"]
    metadata["info"] = {**info, **(metadata.get("info") or {})}

    generation = _settings(GENERATION_KEYS, entry, metadata, "generation_settings")
    if generation:
        metadata["generation_settings"] = generation
    pruning = _settings(PRUNING_KEYS, entry, metadata, "pruning_settings")
    if pruning:
        metadata["pruning_settings"] = pruning
    if options.feature_url:
        base = f"{options.feature_url.rstrip('/')}/features/{role}"
        metadata["feature_details"] = {"feature_json_base_url": base}
    return metadata


def _settings(
    keys: tuple[str, ...], entry: dict[str, Any], metadata: dict[str, Any], name: str
) -> dict[str, Any]:
    """Settings from the graph metadata and the viewer entry (flat or grouped under ``name``);
    only the values recorded there, none assumed."""
    found: dict[str, Any] = {}
    for source in (metadata, entry):
        found.update({k: source[k] for k in keys if source.get(k) is not None})
        found.update(source.get(name) or {})
    return found


def _node(node: Any, path: Path) -> dict[str, Any]:
    from circuit_tracer.frontend.graph_models import Node

    try:
        checked = Node.model_validate(node)
    except ValidationError as err:
        where = node.get("node_id", "?") if isinstance(node, dict) else "?"
        raise ExportError(f"{path}: node {where}: {first_error(err)}") from err
    # The dump fills the defaults Neuronpedia requires (clerp, jsNodeId) on sparse nodes.
    out = {**node, **checked.model_dump()}
    if out["feature_type"] == "logit" and not _LOGIT_PROB.search(out["clerp"]):
        # Both frontends read a logit's probability out of its clerp ("... (p=0.123)") and
        # fail on a logit node without one.
        out["clerp"] = f"{out['clerp'] or 'Output'} (p={float(out['token_prob']):.3f})".strip()
    return out


def _validate_graph(graph: dict[str, Any], path: Path) -> None:
    from circuit_tracer.frontend.graph_models import Link
    from circuit_tracer.frontend.graph_models import Model as GraphModel

    try:
        GraphModel.model_validate(graph)
        for link in graph["links"]:
            Link.model_validate(link)
    except ValidationError as err:
        raise ExportError(f"{path}: not a valid circuit-tracer graph: {first_error(err)}") from err


def _generator() -> dict[str, str]:
    try:
        tracer = version("circuit-tracer")
    except PackageNotFoundError:
        tracer = "unknown"
    return {
        "name": "em-circuits (circuit-tracer)",
        "version": f"em-circuits {__version__}, circuit-tracer {tracer}",
        "url": CIRCUIT_TRACER_URL,
    }


def _is_hub_id(scan: str) -> bool:
    # "org/name" (optionally "@revision"): circuit-tracer's scan for a transcoder set on the hub.
    return re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w.-]+)?", scan) is not None

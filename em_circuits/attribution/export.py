"""Export viewer graphs as a shareable folder in Neuronpedia's attribution-graph JSON format.

``export_graphs()`` reads a viewer folder (``results/viewer/<model>/``, written by
:func:`em_circuits.attribution.viewer.write_viewer_graph`) and writes, for the chosen prompts
and roles:

* ``<prompt_id>--<role>.json``: each graph in circuit-tracer's frontend format, which is the
  format Neuronpedia's upload accepts (its graph JSON schema, ``graph-schema.json`` in the
  neuronpedia repository), with the metadata Neuronpedia reads filled in: ``scan`` set back to
  the transcoder set (or to a Neuronpedia model id), ``info`` (creator, generator, transcoder
  set, creation time), ``generation_settings`` and ``pruning_settings``, and
  ``feature_details`` when the feature files are hosted somewhere;
* ``features/<role>/<feature>.json``: the feature files those graphs' nodes name, in
  circuit-tracer's frontend feature format (also Neuronpedia's feature-details format);
* ``graph-metadata.json``, so circuit-tracer's local server (and ``em-circuits serve``) lists
  the graphs, and ``README.txt`` saying how to view and upload them.

Every graph and feature file is checked against circuit-tracer's pydantic models before
anything is written; a failure is one :class:`ExportError` line naming the file.
"""

from __future__ import annotations

import json
import logging
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from em_circuits.attribution.viewer import (
    ADAPTER_NODE,
    FEATURE_NODE,
    METADATA_FILE,
    ROLES,
    ViewerError,
    read_metadata,
)
from em_circuits.core.atomic import atomic_write_text

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

#: Graph metadata circuit-tracer copies into a graph's ``graph-metadata.json`` entry.
LISTED_KEYS = ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold")

README_FILE = "README.txt"

_LOGIT_PROB = re.compile(r"\(p=[-+0-9.eE]+\)")


class ExportError(ViewerError):
    """A graph or feature file cannot be exported (missing, invalid, or a bad option)."""


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
class _Graph:
    """One graph ready to write: its JSON text and its feature files' texts, by index."""

    slug: str
    entry: dict[str, Any]
    data: dict[str, Any]
    text: str
    features: dict[int, str]
    adapter_nodes: int = 0  # left out: Neuronpedia has no node type for them
    adapter_links: int = 0


class ExportedGraphs(list[Path]):
    """The graph files an export wrote, and ``left_out``: lines saying what of the viewer's
    graphs the export could not carry (also in its README.txt)."""

    def __init__(self, paths: Iterable[Path], left_out: Sequence[str] = ()):
        super().__init__(paths)
        self.left_out = list(left_out)


def export_graphs(
    viewer_dir: Path,
    out_dir: Path,
    prompt_ids: Sequence[str] | None = None,
    roles: Iterable[str] = ROLES,
    options: ExportOptions | None = None,
) -> ExportedGraphs:
    """Write the graphs of ``prompt_ids`` (default: all) and ``roles`` from ``viewer_dir`` into
    ``out_dir`` as a shareable folder; returns the written graph files, with what was left
    out of them (``ExportedGraphs.left_out``).

    Everything is read and validated first, so a bad file leaves ``out_dir`` untouched.
    Exporting again into the same folder replaces those graphs and keeps the others listed.
    """
    options = options or ExportOptions()
    viewer_dir, out_dir = Path(viewer_dir).resolve(), Path(out_dir).resolve()
    if out_dir == viewer_dir:
        raise ExportError(f"export into a folder other than the viewer folder {viewer_dir}")
    roles = tuple(roles)
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        raise ExportError(f"role must be one of {', '.join(ROLES)}, not {', '.join(unknown)}")
    entries = _chosen_entries(viewer_dir, prompt_ids, roles)
    graphs = [_load_graph(viewer_dir, entry, options) for entry in entries]

    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir}: a file, not a folder; give a new or existing folder")
    listing = _listing(out_dir, graphs)
    written = []
    for graph in graphs:
        path = out_dir / f"{graph.slug}.json"
        atomic_write_text(path, graph.text)
        written.append(path)
        for index, text in sorted(graph.features.items()):
            atomic_write_text(out_dir / "features" / graph.entry["role"] / f"{index}.json", text)
    atomic_write_text(out_dir / METADATA_FILE, listing)
    left_out = _left_out(graphs)
    atomic_write_text(out_dir / README_FILE, _readme(graphs, options, left_out))
    return ExportedGraphs(written, left_out)


def _left_out(graphs: list[_Graph]) -> list[str]:
    """What the export dropped from the viewer's graphs, one line each (none: no lines)."""
    with_nodes = [g for g in graphs if g.adapter_nodes]
    if not with_nodes:
        return []
    nodes = sum(g.adapter_nodes for g in with_nodes)
    links = sum(g.adapter_links for g in with_nodes)
    return [
        f"left out {nodes} adapter node(s) ('{ADAPTER_NODE}', the LoRA's own writes) and "
        f"{links} link(s) to or from them, of {len(with_nodes)} graph(s): Neuronpedia's graph "
        "format has no such node type; `em-circuits serve` on the viewer folder draws them"
    ]


def _chosen_entries(
    viewer_dir: Path, prompt_ids: Sequence[str] | None, roles: tuple[str, ...]
) -> list[dict[str, Any]]:
    try:
        entries = read_metadata(viewer_dir)
    except (OSError, ValueError, KeyError) as err:
        raise ExportError(f"{viewer_dir / METADATA_FILE}: unreadable ({err})") from err
    if not entries:
        raise ExportError(
            f"no graphs in {viewer_dir} ({METADATA_FILE} is missing or empty); "
            "run `em-circuits graphs --full-graphs PROMPT_ID` first"
        )
    known = {str(e.get("prompt_id")) for e in entries}
    if prompt_ids is not None:
        missing = [p for p in prompt_ids if p not in known]
        if missing:
            raise ExportError(
                f"no viewer graphs for prompt(s) {', '.join(missing)} in {viewer_dir}; "
                f"it has {', '.join(sorted(known))}"
            )
    chosen = [
        e
        for e in entries
        if e.get("role") in roles and (prompt_ids is None or e.get("prompt_id") in prompt_ids)
    ]
    if not chosen:
        raise ExportError(f"no {'/'.join(roles)} graphs to export in {viewer_dir}")
    return chosen


def _load_graph(viewer_dir: Path, entry: dict[str, Any], options: ExportOptions) -> _Graph:
    slug, role = str(entry["slug"]), str(entry["role"])
    path = viewer_dir / f"{slug}.json"
    data = _read_json(path)
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
    features = _features(viewer_dir, local_scan, role, graph["nodes"])
    text = _dumps(graph, path)
    if len(text.encode("utf-8")) > NEURONPEDIA_MAX_BYTES:
        log.warning("%s: over Neuronpedia's %d MB upload limit", path, NEURONPEDIA_MAX_BYTES >> 20)
    return _Graph(
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
        raise ExportError(f"{path}: node {where}: {_first_error(err)}") from err
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
        raise ExportError(f"{path}: not a valid circuit-tracer graph: {_first_error(err)}") from err


def _features(
    viewer_dir: Path, scan: str, role: str, nodes: list[dict[str, Any]]
) -> dict[int, str]:
    """The feature files of the graph's feature nodes that the viewer folder holds, as the
    texts to write, by index."""
    from circuit_tracer.frontend.feature_models import Model as FeatureModel

    # The frontend fetches "<scan>/<feature>.json" for a local scan, where ./data/ is the
    # viewer folder; without one, the feature files sit in the layout the graph stage uses.
    if scan.startswith("./data/"):
        folder = (viewer_dir / scan[len("./data/") :]).resolve()
        if not folder.is_relative_to(viewer_dir):
            raise ExportError(f"graph scan {scan!r} points outside {viewer_dir}")
    else:
        folder = viewer_dir / "features" / role
    if not folder.is_dir():
        return {}
    layers = {int(n["feature"]): n["layer"] for n in nodes if n["feature_type"] == FEATURE_NODE}
    out: dict[int, str] = {}
    for index, layer in layers.items():
        path = folder / f"{index}.json"
        if not path.is_file():
            continue
        data = _read_json(path)
        try:
            FeatureModel.model_validate(data)
        except ValidationError as err:
            raise ExportError(
                f"{path}: not a valid circuit-tracer feature: {_first_error(err)}"
            ) from err
        if "layer" not in data and str(layer).isdigit():
            # Neuronpedia's feature format recommends the layer, to show it; the frontend
            # format carries only the (layer, feature) pairing index.
            data = {**data, "layer": int(str(layer))}
        out[index] = _dumps(data, path)
    return out


def _listing(out_dir: Path, graphs: list[_Graph]) -> str:
    """``graph-metadata.json`` of the export: these graphs' entries plus those of earlier
    exports into the same folder, by prompt and then base before adapted."""
    try:
        listed = {g["slug"]: g for g in read_metadata(out_dir)}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{out_dir / METADATA_FILE}: unreadable ({err})") from err
    for graph in graphs:
        meta = graph.data["metadata"]
        entry = {k: meta[k] for k in LISTED_KEYS if k in meta}
        for key in ("prompt_id", "role", "title_prefix"):
            if key in graph.entry:
                entry[key] = graph.entry[key]
        listed[graph.slug] = entry
    order = {role: i for i, role in enumerate(ROLES)}
    entries = sorted(
        listed.values(),
        key=lambda e: (str(e.get("prompt_id", "")), order.get(str(e.get("role")), 9), e["slug"]),
    )
    return json.dumps({"graphs": entries}, indent=1)


def _readme(graphs: list[_Graph], options: ExportOptions, left_out: Sequence[str] = ()) -> str:
    scans = sorted({str(g.data["metadata"]["scan"]) for g in graphs})
    # One file per role and feature: graphs of one role share the files of common features.
    n_features = len({(g.entry["role"], index) for g in graphs for index in g.features})
    uploadable = options.model_id is not None
    slug = graphs[0].slug
    lines = [
        "Attribution graphs exported by em-circuits",
        "",
        f"{len(graphs)} graph(s) as <prompt_id>--<role>.json in Neuronpedia's graph JSON format",
        "(circuit-tracer's frontend format plus metadata.info, generation_settings and",
        f"pruning_settings); {n_features} feature file(s) under features/<role>/ in the",
        "frontend's feature format; graph-metadata.json lists the graphs.",
        f"scan: {', '.join(scans)}",
        *(text for line in left_out for text in textwrap.wrap(f"Note: {line}.", 88)),
        "",
        "View here (offline):",
        "  em-circuits serve --viewer-dir .",
        f"  then open http://127.0.0.1:8041/index.html?slug={slug}",
        "or with circuit-tracer alone (its page loads scripts from CDNs):",
        "  circuit-tracer start-server --graph_file_dir .",
        f"  then open http://localhost:8032/index.html?slug={slug}",
        "The local frontend looks features up by scan on the internet; the feature files",
        "here are for hosting (below).",
        "",
        "Upload to Neuronpedia (https://www.neuronpedia.org/graph/validator checks a file):",
    ]
    if not uploadable:
        lines += [
            "  1. Neuronpedia files a graph under the model its metadata.scan names, and only",
            "     one it hosts (or you create there). Re-export with that model id:",
            "       em-circuits export ... --neuronpedia-model MODEL_ID",
        ]
    else:
        lines += [f"  1. scan is the Neuronpedia model {options.model_id}; it must exist there."]
    if options.feature_url:
        lines += [f"  2. Serve features/ at {options.feature_url}/features (public, https, CORS)."]
    else:
        lines += [
            "  2. For feature details, host features/ publicly (https, CORS from any origin)",
            "     and re-export with --feature-url URL (the folder holding features/).",
        ]
    lines += [
        "  3. pip install neuronpedia; set NEURONPEDIA_API_KEY (neuronpedia.org/account);",
        "     python -c 'from neuronpedia.np_graph_metadata import NPGraphMetadata;",
        f'       print(NPGraphMetadata.upload_file("{slug}.json").url)\'',
        "     (one call per graph file; at most 100 MB a file)",
        "",
    ]
    return "\n".join(lines)


def _generator() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from em_circuits.core.version import __version__

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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ExportError(f"{path}: missing") from err
    except (OSError, ValueError) as err:
        raise ExportError(f"{path}: unreadable JSON ({err})") from err


def _dumps(data: Any, path: Path) -> str:
    try:
        # Strict JSON: NaN or Infinity would be refused by browsers' and Neuronpedia's parsers.
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as err:
        raise ExportError(f"{path}: {err}") from err


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "root"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"

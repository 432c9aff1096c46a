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
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from em_circuits.attribution.export_json import ExportError
from em_circuits.attribution.neuronpedia_graph import (
    ExportGraph,
    ExportOptions,
    load_export_graph,
)
from em_circuits.attribution.viewer_adapter_nodes import ADAPTER_NODE
from em_circuits.attribution.viewer_metadata import METADATA_FILE, ROLES, read_metadata
from em_circuits.core.atomic import atomic_write_text

#: Graph metadata circuit-tracer copies into a graph's ``graph-metadata.json`` entry.
LISTED_KEYS = ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold")

README_FILE = "README.txt"


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
    graphs = [load_export_graph(viewer_dir, entry, options) for entry in entries]

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


def _left_out(graphs: list[ExportGraph]) -> list[str]:
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


def _listing(out_dir: Path, graphs: list[ExportGraph]) -> str:
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


def _readme(graphs: list[ExportGraph], options: ExportOptions, left_out: Sequence[str] = ()) -> str:
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

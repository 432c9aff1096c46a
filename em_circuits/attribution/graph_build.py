"""Computing, checking and storing one graph (:func:`build_graph`): its compact file, its
dense adjacency and viewer JSON when asked, and last its metadata artifact."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from em_circuits.attribution.attribute import attribute_prompt, check_labels_against_graph
from em_circuits.attribution.storage import (
    CompactGraph,
    content_fingerprint,
    serialize_compact,
    write_bytes_hashed,
)
from em_circuits.attribution.storage_full import save_full
from em_circuits.attribution.stored_graphs import graph_paths
from em_circuits.attribution.targets import AttributionParams, PromptTargets
from em_circuits.attribution.totals_graph import totals_prompt
from em_circuits.attribution.viewer import write_viewer_graph
from em_circuits.core.schemas import GraphMetaRecord
from em_circuits.core.store import ResultsStore, write_artifact
from em_circuits.models.load import LoadedModel

log = logging.getLogger(__name__)


def build_graph(
    store: ResultsStore,
    model: LoadedModel,
    role: str,
    pt: PromptTargets,
    params: AttributionParams,
    save_full_graph: bool = False,
    viewer_dir: Path | None = None,
    computed: tuple[CompactGraph, Any, dict[str, Any]] | None = None,
) -> GraphMetaRecord:
    """Compute (unless ``computed`` holds the graph already, as a batch of prompts gives it),
    check and store one graph; returns its metadata artifact.

    Only a full-mode graph has a dense adjacency (``save_full_graph``) and viewer JSON.
    """
    computed = computed or attribute_prompt(model, pt, params, role)
    return start_storing(
        store, model, role, pt, params, computed, save_full_graph, viewer_dir
    ).finish()


@dataclass
class StoringGraph:
    """A graph whose compact file is being written (``file_written`` waits for it, e.g. a
    thread's future); :meth:`finish` waits and writes the metadata, which marks the graph
    complete."""

    meta_path: Path
    record: dict[str, Any]
    file_written: Callable[[], tuple[int, str]]

    def finish(self) -> GraphMetaRecord:
        compact_bytes, compact_sha256 = self.file_written()
        self.record["files"] |= {"compact_bytes": compact_bytes, "compact_sha256": compact_sha256}
        # The meta file is written last: its presence marks a complete graph.
        return write_artifact(self.meta_path, "graph_meta", self.record)


def start_storing(
    store: ResultsStore,
    model: LoadedModel,
    role: str,
    pt: PromptTargets,
    params: AttributionParams,
    computed: tuple[CompactGraph, Any, dict[str, Any]],
    save_full_graph: bool = False,
    viewer_dir: Path | None = None,
    write_file: Callable[[Path, bytes], Callable[[], tuple[int, str]]] | None = None,
) -> StoringGraph:
    """Check one computed graph and start storing it: its compact file is handed to
    ``write_file(path, data)`` (which returns a wait for its size and sha256; default: written
    here and now), its dense adjacency and viewer JSON written, its metadata prepared."""
    compact, graph, info = computed
    paths = graph_paths(store, model.slug, pt, params)
    mismatches = check_labels_against_graph(pt, role, info["logits"], model.dtype)
    for m in mismatches:
        log.warning(
            "prompt %s, %s: label for %r was made on logit %.4f, graph has %.4f",
            pt.prompt_id,
            model.slug,
            m["token"],
            m["stored_logit"],
            m["graph_logit"],
        )
    file_written = (write_file or _written_now)(paths["compact"], serialize_compact(compact))
    full_bytes = None
    if save_full_graph and info["dense"] is not None:
        full_bytes = save_full(paths["full"], info["dense"])
    if viewer_dir is not None and graph is not None:
        _write_viewer(graph, compact, viewer_dir, model, role, pt, params)
    top = [
        {"token_id": int(t), "token": model.tokenizer.decode([int(t)]), "logit": float(v)}
        for t, v in zip(compact.top_token_ids, compact.top_logits)
    ]
    record = {
        "prompt_id": pt.prompt_id,
        "role": role,
        **model.identity(),
        "params_key": pt.key(params),
        "params": asdict(params),
        "targets": _target_records(compact),
        "top_logits": top,
        "label_check": {
            "checked": len(pt.stored_logits.get(role, {})),
            "mismatches": mismatches,
        },
        "files": {
            "compact": paths["compact"].name,
            "compact_bytes": None,  # set once the file is written
            "compact_sha256": None,
            "full": paths["full"].name if full_bytes else None,
            "full_bytes": full_bytes,
        },
        "graph_fingerprint": content_fingerprint(compact),
        "input_format": model.input_format,
        "n_features_active": info["n_active_features"],
        "n_features_selected": info["n_selected_features"],
        "n_pos": compact.n_pos,
        "n_layers": compact.n_layers,
        "seconds": round(info["seconds"], 3),
        # how many adapter nodes the graph holds, or why none (read without the graph)
        **(
            {"adapter_nodes": compact.meta["adapter_nodes"]}
            if "adapter_nodes" in compact.meta
            else {}
        ),
    }
    return StoringGraph(paths["meta"], record, file_written)


def _written_now(path: Path, data: bytes) -> Callable[[], tuple[int, str]]:
    written = write_bytes_hashed(path, data)
    return lambda: written


def _write_viewer(
    graph: Any,
    compact: CompactGraph,
    viewer_dir: Path,
    model: LoadedModel,
    role: str,
    pt: PromptTargets,
    params: AttributionParams,
) -> None:
    """Write a full graph's viewer JSON, its targets named from the compact graph's table and
    the adapted model's adapter nodes drawn in (:func:`_adapter_overlay`)."""
    labels = compact.meta.get("target_labels") or [None] * len(compact.target_names)
    targets = [
        {"name": name, "kind": kind, "label": label, "prob": float(prob), "value": float(v)}
        for name, kind, label, prob, v in zip(
            compact.target_names,
            compact.target_kinds,
            labels,
            compact.target_probs.tolist(),
            compact.target_values.tolist(),
        )
    ]
    write_viewer_graph(
        graph,
        viewer_dir,
        pt.prompt_id,
        role,
        targets=targets,
        adapter_graph=_adapter_overlay(model, pt, params),
    )


def _target_records(compact: CompactGraph) -> list[dict[str, Any]]:
    """The metadata's table of a graph's targets: name, kind, label, token id, value, logit
    and probability of each."""
    return [
        {
            "name": n,
            "kind": k,
            "label": lab,
            "token_id": int(t),
            "value": float(v),
            "logit": float(lg),
            "prob": float(p),
        }
        for n, k, lab, t, v, lg, p in zip(
            compact.target_names,
            compact.target_kinds,
            compact.meta["target_labels"],
            compact.target_token_ids,
            compact.target_values,
            compact.target_logits,
            compact.target_probs,
        )
    ]


#: Features (by total effect on the contrast) whose edges from the adapter nodes the viewer
#: may draw: the viewer's pruned graph draws the most influential ones.
VIEWER_ADAPTER_FEATURES = 256


def _adapter_overlay(model: LoadedModel, pt: PromptTargets, params: AttributionParams) -> Any:
    """The adapted model's adapter nodes for the viewer's full graph of ``pt``
    (``AdapterDetail``): from a totals graph of the same prompt, with their edges into the
    features most influential on the contrast and what they read; None without nodes."""
    if model.spec.adapter is None or not params.adapter_nodes:
        return None
    totals = replace(params, mode="totals", adapter_split_features=VIEWER_ADAPTER_FEATURES)
    return totals_prompt(model, pt, totals)[2]["adapter_detail"]

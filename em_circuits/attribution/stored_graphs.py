"""Stored graphs: where a graph's files are, whether they are intact, finding and loading them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from em_circuits.attribution.storage import CompactGraph, load_compact
from em_circuits.attribution.targets import AttributionParams, PromptTargets
from em_circuits.core.atomic import sha256_file
from em_circuits.core.schemas import GraphMetaRecord
from em_circuits.core.store import ArtifactError, ResultsStore, read_artifact

log = logging.getLogger(__name__)


class GraphIntegrityError(ArtifactError):
    """A compact graph file does not match the size or sha256 its metadata records."""


def compact_problem(
    store: ResultsStore, meta: GraphMetaRecord, check_hash: bool = True
) -> str | None:
    """What is wrong with the compact graph file a meta artifact describes; None when it is the
    file that was written (same size and, with ``check_hash``, same sha256).

    A truncated or overwritten file otherwise counts as a finished graph: the graph stage
    never recomputes it and every analysis run fails on it.
    """
    path = store.compact_graph_path(meta)
    files: dict[str, Any] = dict(meta.get("files") or {})
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "the compact graph file is missing"
    expected = files.get("compact_bytes")
    if isinstance(expected, int) and size != expected:
        return f"{size} bytes where its metadata records {expected} (truncated or replaced)"
    digest = files.get("compact_sha256")  # absent in metadata written before it was recorded
    if check_hash and digest and sha256_file(path) != digest:
        return "its sha256 differs from the one its metadata records (corrupted or replaced)"
    return None


def cached_graph_meta(
    store: ResultsStore,
    slug: str,
    fp: str,
    pt: PromptTargets,
    params: AttributionParams,
    warn: bool = True,
) -> GraphMetaRecord | None:
    """The stored graph for these exact model, targets and parameters, if complete and intact.

    A graph whose compact file fails its size or sha256 check is a miss, with a warning naming
    the file, so the stage computes it again.
    """
    paths = graph_paths(store, slug, pt, params)
    meta = store.load_for_model(paths["meta"], "graph_meta", fp, params_key=pt.key(params))
    if meta is None:
        return None
    problem = compact_problem(store, meta)
    if problem is not None:
        if warn:
            log.warning("%s: %s; computing the graph again", paths["compact"], problem)
        return None
    return meta


def load_graph(store: ResultsStore, meta: GraphMetaRecord) -> CompactGraph:
    """The compact graph a metadata artifact describes; GraphIntegrityError when the file is
    not the one that was written."""
    path = store.compact_graph_path(meta)
    problem = compact_problem(store, meta)
    if problem is not None:
        raise GraphIntegrityError(
            path, problem, "run `em-circuits graphs` (or `em-circuits run`) to compute it again"
        )
    graph = load_compact(path)
    problem = non_finite_problem(graph)
    if problem is not None:
        raise GraphIntegrityError(
            path,
            problem,
            "delete it and its .json, then run `em-circuits graphs` to compute it again",
        )
    return graph


def non_finite_problem(graph: CompactGraph) -> str | None:
    """Which stored tensor holds NaN/Inf, if any. Only the logit and probability of a
    direction target (the contrast, token id -1) are NaN by design."""
    for name in ("activations", "direct", "total", "target_values", "top_logits"):
        tensor = getattr(graph, name)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            return f"{bad} non-finite value(s) (NaN/Inf) in its {name!r} tensor"
    tokens = graph.target_token_ids >= 0
    for name in ("target_logits", "target_probs"):
        values = getattr(graph, name)[tokens]
        if not bool(torch.isfinite(values).all()):
            return f"a non-finite {name[7:]} of a token target (NaN/Inf)"
    return None


def find_graph_metas(store: ResultsStore, model_slug: str) -> list[GraphMetaRecord]:
    """All complete graphs of one model, one per prompt: its totals graph where it has one,
    else its full graph (the newest when parameters differ).

    A graph whose compact file is missing or has another size than recorded is left out, with
    a warning naming the file (the sha256 is checked when the graph is loaded: hashing every
    file here would make ``--status`` read them all).
    """
    latest: dict[str, GraphMetaRecord] = {}
    for path in store.graph_meta_paths(model_slug):
        meta = read_artifact(path, "graph_meta")
        if not store.compact_graph_path(meta).is_file():
            continue
        problem = compact_problem(store, meta, check_hash=False)
        if problem is not None:
            log.warning(
                "%s: %s; left out until `em-circuits graphs` computes it again",
                store.compact_graph_path(meta),
                problem,
            )
            continue
        pid = meta["prompt_id"]
        if pid not in latest or _preference(meta) > _preference(latest[pid]):
            latest[pid] = meta
    return [latest[pid] for pid in sorted(latest)]


def graph_mode(meta: GraphMetaRecord) -> str:
    """ "totals" or "full" (graphs stored before totals mode existed are full graphs)."""
    return str(dict(meta.get("params") or {}).get("mode", "full"))


def _preference(meta: GraphMetaRecord) -> tuple[bool, str]:
    # The analysis reads a prompt's totals graph (every active feature) over a full graph
    # (the most influential features only) made for the viewer; the newest among equals.
    return graph_mode(meta) == "totals", str(meta["created"])


def graph_paths(
    store: ResultsStore, slug: str, pt: PromptTargets, params: AttributionParams
) -> dict[str, Path]:
    return store.graph_paths(slug, pt.prompt_id, pt.key(params))

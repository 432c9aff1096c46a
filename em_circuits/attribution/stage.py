"""The graph stage: which graphs exist, computing the missing ones, storing them."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from em_circuits.attribution.attribute import attribute_prompt, check_labels_against_graph
from em_circuits.attribution.storage import (
    CompactGraph,
    content_fingerprint,
    load_compact,
    save_compact,
    save_full,
)
from em_circuits.attribution.targets import AttributionParams, GraphError, PromptTargets
from em_circuits.core.schemas import GraphMetaRecord
from em_circuits.core.store import ResultsStore, read_artifact, write_artifact
from em_circuits.models.load import LoadedModel, NonFiniteError

log = logging.getLogger(__name__)


def cached_graph_meta(
    store: ResultsStore, slug: str, fp: str, pt: PromptTargets, params: AttributionParams
) -> GraphMetaRecord | None:
    """The stored graph for these exact model, targets and parameters, if complete."""
    paths = graph_paths(store, slug, pt, params)
    meta = store.load_for_model(paths["meta"], "graph_meta", fp, params_key=pt.key(params))
    if meta is None or not paths["compact"].is_file():
        return None
    return meta


def build_graph(
    store: ResultsStore,
    model: LoadedModel,
    role: str,
    pt: PromptTargets,
    params: AttributionParams,
    save_full_graph: bool = False,
    viewer_dir: Path | None = None,
) -> GraphMetaRecord:
    """Compute, check and store one graph; returns its metadata artifact."""
    compact, graph, info = attribute_prompt(model, pt, params, role)
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
    compact_bytes = save_compact(compact, paths["compact"])
    full_bytes = None
    if save_full_graph:
        full_bytes = save_full(paths["full"], info["dense"])
    if viewer_dir is not None:
        from em_circuits.attribution.viewer import write_viewer_graph

        write_viewer_graph(graph, viewer_dir, pt.prompt_id, role)
    top = [
        {"token_id": int(t), "token": model.tokenizer.decode([int(t)]), "logit": float(v)}
        for t, v in zip(compact.top_token_ids, compact.top_logits)
    ]
    # The meta file is written last: its presence marks a complete graph.
    return write_artifact(
        paths["meta"],
        "graph_meta",
        {
            "prompt_id": pt.prompt_id,
            "role": role,
            **model.identity(),
            "params_key": pt.key(params),
            "params": asdict(params),
            "targets": [
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
            ],
            "top_logits": top,
            "label_check": {
                "checked": len(pt.stored_logits.get(role, {})),
                "mismatches": mismatches,
            },
            "files": {
                "compact": paths["compact"].name,
                "compact_bytes": compact_bytes,
                "full": paths["full"].name if full_bytes else None,
                "full_bytes": full_bytes,
            },
            "graph_fingerprint": content_fingerprint(compact),
            "n_features_active": info["n_active_features"],
            "n_features_selected": info["n_selected_features"],
            "n_pos": compact.n_pos,
            "n_layers": compact.n_layers,
            "seconds": round(info["seconds"], 3),
        },
    )


def load_graph(store: ResultsStore, meta: GraphMetaRecord) -> CompactGraph:
    """The compact graph a metadata artifact describes."""
    return load_compact(store.compact_graph_path(meta))


def find_graph_metas(store: ResultsStore, model_slug: str) -> list[GraphMetaRecord]:
    """All complete graphs of one model (newest per prompt when parameters differ)."""
    latest: dict[str, GraphMetaRecord] = {}
    for path in store.graph_meta_paths(model_slug):
        meta = read_artifact(path, "graph_meta")
        if not store.compact_graph_path(meta).is_file():
            continue
        pid = meta["prompt_id"]
        if pid not in latest or meta["created"] > latest[pid]["created"]:
            latest[pid] = meta
    return [latest[pid] for pid in sorted(latest)]


@dataclass
class StageResult:
    computed: list[str]
    cached: list[str]
    failed: dict[str, str]


def run_graph_stage(
    store: ResultsStore,
    specs: dict[str, Any],
    targets: list[PromptTargets],
    params: AttributionParams,
    device: torch.device | str,
    force: bool = False,
    save_full_graph: bool = False,
    viewer_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, StageResult]:
    """Graphs for every prompt, one model at a time: each model is loaded once, then freed.

    Under ``accelerate launch`` each process takes every n-th prompt and the call returns when
    all processes are done; each result then lists that process's prompts only.
    """
    from tqdm import tqdm

    from em_circuits.core.distributed import current_shard
    from em_circuits.models.load import load_model, release
    from em_circuits.models.spec import fingerprint, model_slug

    shard = current_shard()
    targets = shard.take(targets)
    results: dict[str, StageResult] = {}
    for role, spec in specs.items():
        result = StageResult([], [], {})
        results[role] = result
        fp = fingerprint(spec, device)
        slug = model_slug(spec, fp)
        todo = []
        for pt in targets:
            if not force and cached_graph_meta(store, slug, fp, pt, params) is not None:
                result.cached.append(pt.prompt_id)
            else:
                todo.append(pt)
        if not todo:
            log.info("%s: all %d graphs cached", slug, len(result.cached))
            continue
        model = load_model(spec, device, store.merged_cache_dir)
        try:
            for pt in tqdm(todo, desc=f"graphs {role}", disable=not progress, unit="prompt"):
                try:
                    build_graph(store, model, role, pt, params, save_full_graph, viewer_dir)
                    result.computed.append(pt.prompt_id)
                except (GraphError, NonFiniteError) as err:
                    log.error("skipping: %s", err)
                    result.failed[pt.prompt_id] = str(err)
        finally:
            release(model)
    shard.wait()
    return results


def graph_paths(
    store: ResultsStore, slug: str, pt: PromptTargets, params: AttributionParams
) -> dict[str, Path]:
    return store.graph_paths(slug, pt.prompt_id, pt.key(params))

"""The graph stage: which graphs exist, computing the missing ones, storing them."""

from __future__ import annotations

import logging
import time
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
from em_circuits.attribution.targets import (
    AttributionParams,
    FullGraphChoice,
    GraphError,
    PromptTargets,
)
from em_circuits.core.atomic import sha256_file
from em_circuits.core.claims import read_holder, try_claim
from em_circuits.core.schemas import GraphMetaRecord
from em_circuits.core.store import ArtifactError, ResultsStore, read_artifact, write_artifact
from em_circuits.models.load import LoadedModel, NonFiniteError, PromptTooLongError, ResidentModels

log = logging.getLogger(__name__)

#: How often a process waiting for graphs that another process is computing looks again, and
#: how often it says that it is still waiting.
CLAIM_POLL_SECONDS = 1.0
WAIT_LOG_SECONDS = 30.0


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


def build_graph(
    store: ResultsStore,
    model: LoadedModel,
    role: str,
    pt: PromptTargets,
    params: AttributionParams,
    save_full_graph: bool = False,
    viewer_dir: Path | None = None,
) -> GraphMetaRecord:
    """Compute, check and store one graph; returns its metadata artifact.

    Only a full-mode graph has a dense adjacency (``save_full_graph``) and viewer JSON.
    """
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
    compact_sha256 = sha256_file(paths["compact"])
    full_bytes = None
    if save_full_graph and info["dense"] is not None:
        full_bytes = save_full(paths["full"], info["dense"])
    if viewer_dir is not None and graph is not None:
        from em_circuits.attribution.viewer import write_viewer_graph

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
                "compact_sha256": compact_sha256,
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
        },
    )


#: Features (by total effect on the contrast) whose edges from the adapter nodes the viewer
#: may draw: the viewer's pruned graph draws the most influential ones.
VIEWER_ADAPTER_FEATURES = 256


def _adapter_overlay(model: LoadedModel, pt: PromptTargets, params: AttributionParams) -> Any:
    """The adapted model's adapter nodes for the viewer's full graph of ``pt``
    (``AdapterDetail``): from a totals graph of the same prompt, with their edges into the
    features most influential on the contrast and what they read; None without nodes."""
    from dataclasses import replace

    from em_circuits.attribution.attribute import totals_prompt

    if model.spec.adapter is None or not params.adapter_nodes:
        return None
    totals = replace(params, mode="totals", adapter_split_features=VIEWER_ADAPTER_FEATURES)
    return totals_prompt(model, pt, totals)[2]["adapter_detail"]


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


@dataclass
class StageResult:
    computed: list[str]
    cached: list[str]
    failed: dict[str, str]
    #: The full graphs (feature-to-feature edges, viewer JSON) of the prompts chosen for them.
    full: StageResult | None = None


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
    full_graphs: FullGraphChoice | None = None,
    resident: ResidentModels | None = None,
) -> dict[str, StageResult]:
    """Graphs for every prompt and model, both models resident on one transcoder set.

    In totals mode (the default) every prompt gets the exact direct and total effects of all
    its active features; the prompts ``full_graphs`` chooses then also get a full graph
    (feature-to-feature edges, written for the viewer when ``viewer_dir`` is given). In full
    mode every prompt gets a full graph. ``resident`` keeps the models loaded across calls
    (a notebook, a benchmark); by default they are loaded on the first graph to compute and
    released at the end.

    Under ``accelerate launch`` each process takes every n-th prompt and the call returns when
    all processes are done; each result then lists that process's prompts only.

    Processes that share the results directory otherwise (two pipelines started on it) claim
    each graph before computing it (:mod:`em_circuits.core.claims`): a graph another live
    process is computing is skipped, and waited for at the end, so each is computed once.
    """
    from em_circuits.core.distributed import current_shard

    shard = current_shard()
    full_mode = params.mode == "full"
    results = _graphs_for(
        store,
        specs,
        shard.take(targets),
        params,
        device,
        force=force,
        save_full_graph=save_full_graph and full_mode,
        viewer_dir=viewer_dir if full_mode else None,
        progress=progress,
        resident=resident,
    )
    shard.wait()
    if full_graphs and not full_mode:
        # Ranking needs every prompt's totals, so it runs after all processes are done.
        chosen = choose_full_graph_prompts(store, specs, targets, params, device, full_graphs)
        log.info(
            "full graphs for %d prompt(s): %s", len(chosen), ", ".join(p.prompt_id for p in chosen)
        )
        full = _graphs_for(
            store,
            specs,
            shard.take(chosen),
            params.full(),
            device,
            force=force,
            save_full_graph=save_full_graph,
            viewer_dir=viewer_dir,
            progress=progress,
            resident=resident,
        )
        for role, result in results.items():
            result.full = full[role]
        shard.wait()
    return results


def contrast_shift(metas: dict[str, GraphMetaRecord | None]) -> float:
    """How far the adapter moves a prompt's contrast value towards evil (adapted minus base;
    the adapted value alone without a base graph; -inf without a contrast target)."""

    def value(meta: GraphMetaRecord | None) -> float | None:
        for target in meta["targets"] if meta is not None else []:
            if target["kind"] == "contrast":
                return float(target["value"])
        return None

    adapted, base = value(metas.get("adapted")), value(metas.get("base"))
    if adapted is None:
        return float("-inf")
    return adapted - (base or 0.0)


def choose_full_graph_prompts(
    store: ResultsStore,
    specs: dict[str, Any],
    targets: list[PromptTargets],
    params: AttributionParams,
    device: torch.device | str,
    choice: FullGraphChoice,
) -> list[PromptTargets]:
    """The prompts ``choice`` names (in its order), then the top prompts by contrast shift."""
    by_id = {pt.prompt_id: pt for pt in targets}
    unknown = [pid for pid in choice.prompt_ids if pid not in by_id]
    if unknown:
        log.warning(
            "no labeled prompt with id %s: no full graph for it (see `em-circuits status`)",
            ", ".join(unknown),
        )
    chosen = [by_id[pid] for pid in dict.fromkeys(choice.prompt_ids) if pid in by_id]
    if choice.top > 0:
        identities = model_identities(specs, device)
        scored = []
        for pt in targets:
            if pt.prompt_id in choice.prompt_ids:
                continue
            metas = {
                role: cached_graph_meta(store, slug, fp, pt, params, warn=False)
                for role, (slug, fp) in identities.items()
            }
            scored.append((contrast_shift(metas), pt.prompt_id, pt))
        scored.sort(key=lambda item: (-item[0], item[1]))
        chosen += [pt for _, _, pt in scored[: choice.top]]
    return chosen


def model_identities(
    specs: dict[str, Any], device: torch.device | str
) -> dict[str, tuple[str, str]]:
    """Each role's (model slug, fingerprint)."""
    from em_circuits.models.spec import fingerprint, model_slug

    identities = {}
    for role, spec in specs.items():
        fp = fingerprint(spec, device)
        identities[role] = (model_slug(spec, fp), fp)
    return identities


def _graphs_for(
    store: ResultsStore,
    specs: dict[str, Any],
    targets: list[PromptTargets],
    params: AttributionParams,
    device: torch.device | str,
    *,
    force: bool,
    save_full_graph: bool,
    viewer_dir: Path | None,
    progress: bool,
    resident: ResidentModels | None = None,
) -> dict[str, StageResult]:
    """Each prompt's graphs, model by model, each under a claim; cached ones are skipped.

    Models are loaded on the first graph this process computes, so a process whose graphs all
    turn out to be cached or another's work never loads them.
    """
    from tqdm import tqdm

    identities = model_identities(specs, device)
    results = {role: StageResult([], [], {}) for role in specs}
    pending: list[tuple[str, PromptTargets]] = []
    for pt in targets:
        for role, (slug, fp) in identities.items():
            if not force and cached_graph_meta(store, slug, fp, pt, params) is not None:
                results[role].cached.append(pt.prompt_id)
            else:
                pending.append((role, pt))
    if not pending:
        for role, (slug, _) in identities.items():
            log.info("%s: all %d %s graphs cached", slug, len(results[role].cached), params.mode)
        return results
    models = resident or ResidentModels(specs, device, store.merged_cache_dir)
    deferred: set[tuple[str, str]] = set()  # graphs found claimed by another process
    last_wait_log = float("-inf")
    desc = "graphs" if params.mode == "totals" else "full graphs"
    bar = tqdm(total=len(pending), desc=desc, disable=not progress, unit="graph")
    try:
        while pending:
            progressed = False
            for item in list(pending):
                role, pt = item
                slug, fp = identities[role]
                result = results[role]
                claim = try_claim(store.graph_claim_path(slug, pt.prompt_id, pt.key(params)))
                if claim is None:
                    deferred.add((role, pt.prompt_id))
                    continue
                pending.remove(item)
                progressed = True
                with claim:
                    # Checked again under the claim: another process may have finished this
                    # graph since the cache was first checked (with --force only if it was
                    # seen claimed, i.e. computed during this run).
                    if (not force or (role, pt.prompt_id) in deferred) and cached_graph_meta(
                        store, slug, fp, pt, params, warn=False
                    ) is not None:
                        result.cached.append(pt.prompt_id)
                        bar.update()
                        continue
                    try:
                        build_graph(
                            store, models.get(role), role, pt, params, save_full_graph, viewer_dir
                        )
                        result.computed.append(pt.prompt_id)
                    except (GraphError, NonFiniteError, PromptTooLongError) as err:
                        log.error("skipping: %s", err)
                        result.failed[pt.prompt_id] = str(err)
                bar.update()
            if pending and not progressed:
                if time.monotonic() - last_wait_log >= WAIT_LOG_SECONDS:
                    last_wait_log = time.monotonic()
                    log.info(
                        "waiting for %d graph(s) that other processes are computing: %s",
                        len(pending),
                        "; ".join(
                            _claimed_by(store, identities[role][0], pt, params)
                            for role, pt in pending[:5]
                        ),
                    )
                time.sleep(CLAIM_POLL_SECONDS)
    finally:
        bar.close()
        if resident is None:
            models.release()
    return results


def _claimed_by(
    store: ResultsStore, slug: str, pt: PromptTargets, params: AttributionParams
) -> str:
    holder = read_holder(store.graph_claim_path(slug, pt.prompt_id, pt.key(params)))
    return f"prompt {pt.prompt_id} ({holder.describe() if holder else 'released'})"


def graph_paths(
    store: ResultsStore, slug: str, pt: PromptTargets, params: AttributionParams
) -> dict[str, Path]:
    return store.graph_paths(slug, pt.prompt_id, pt.key(params))

"""The graph stage: which graphs exist, computing the missing ones, storing them."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from em_circuits.attribution.attribute import attribute_prompt, prompt_ids
from em_circuits.attribution.graph_build import StoringGraph, start_storing
from em_circuits.attribution.stored_graphs import cached_graph_meta
from em_circuits.attribution.targets import (
    AttributionParams,
    FullGraphChoice,
    GraphError,
    PromptTargets,
)
from em_circuits.attribution.totals_graph import totals_prompts
from em_circuits.attribution.write_behind import WriteBehind
from em_circuits.core.claims import read_holder, try_claim
from em_circuits.core.distributed import Shard, current_shard
from em_circuits.core.schemas import GraphMetaRecord
from em_circuits.core.store import ResultsStore
from em_circuits.models.load import (
    LoadedModel,
    NonFiniteError,
    PromptTooLongError,
    ResidentModels,
)
from em_circuits.models.spec import fingerprint, model_slug

log = logging.getLogger(__name__)

#: How often a process waiting for graphs that another process is computing looks again, and
#: how often it says that it is still waiting.
CLAIM_POLL_SECONDS = 1.0
WAIT_LOG_SECONDS = 30.0


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

    Under ``accelerate launch`` / ``torchrun`` the processes claim batches of similar-length
    prompts, longest first (:meth:`~em_circuits.core.distributed.Shard.claim_batches`), and the
    call returns when all processes are done; each result then lists that process's prompts
    only.

    Processes that share the results directory otherwise (two pipelines started on it) claim
    each graph before computing it (:mod:`em_circuits.core.claims`): a graph another live
    process is computing is skipped, and waited for at the end, so each is computed once.
    """
    shard = current_shard()
    full_mode = params.mode == "full"
    models = resident or ResidentModels(specs, device, store.merged_cache_dir)
    options: dict[str, Any] = {"force": force, "progress": progress, "models": models}
    try:
        results = _shared_graphs(
            shard,
            store,
            specs,
            targets,
            params,
            device,
            save_full_graph=save_full_graph and full_mode,
            viewer_dir=viewer_dir if full_mode else None,
            **options,
        )
        shard.wait()
        if full_graphs and not full_mode:
            # Ranking needs every prompt's totals, so it runs after all processes are done.
            chosen = choose_full_graph_prompts(store, specs, targets, params, device, full_graphs)
            log.info(
                "full graphs for %d prompt(s): %s",
                len(chosen),
                ", ".join(p.prompt_id for p in chosen),
            )
            full = _shared_graphs(
                shard,
                store,
                specs,
                chosen,
                params.full(),
                device,
                save_full_graph=save_full_graph,
                viewer_dir=viewer_dir,
                **options,
            )
            for role, result in results.items():
                result.full = full[role]
            shard.wait()
    finally:
        if resident is None:
            models.release()
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
    identities = {}
    for role, spec in specs.items():
        fp = fingerprint(spec, device)
        identities[role] = (model_slug(spec, fp), fp)
    return identities


def graph_batch_limit(params: AttributionParams, device: torch.device | str) -> int:
    """Most prompts one forward pass of the torch engine may batch; 1 where nothing is
    batched (each process claims prompts in batches of similar length, up to this many)."""
    batched = params.mode == "totals" and params.engine == "torch" and params.graph_batch != 1
    if not batched or (torch.device(device).type != "cuda" and not params.graph_batch):
        return 1
    return params.graph_batch or MAX_GRAPH_BATCH


def _shared_graphs(
    shard: Shard,
    store: ResultsStore,
    specs: dict[str, Any],
    targets: list[PromptTargets],
    params: AttributionParams,
    device: torch.device | str,
    *,
    progress: bool,
    **options: Any,
) -> dict[str, StageResult]:
    """This process's share of the graphs: batches of similar-length prompts claimed longest
    first (a prompt's cost: its length), each batch's graphs computed as :func:`_graphs_for`
    does; every list of the results in the order of ``targets``."""
    results = {role: StageResult([], [], {}) for role in specs}
    desc = "graphs" if params.mode == "totals" else "full graphs"
    # the total is known only alone: under a launch each process claims as it goes
    total = len(targets) * len(specs) if shard.count == 1 else None
    writes = WriteBehind()
    with tqdm(total=total, desc=desc, disable=not progress, unit="graph") as bar, writes:
        size = graph_batch_limit(params, device)
        for unit in shard.claim_batches(targets, lambda pt: len(pt.text), size):
            done = _graphs_for(
                store, specs, unit, params, device, bar=bar, writes=writes, **options
            )
            for role, result in done.items():
                results[role].computed += result.computed
                results[role].cached += result.cached
                results[role].failed.update(result.failed)
    position = {pt.prompt_id: i for i, pt in enumerate(targets)}
    for role, result in results.items():
        result.computed.sort(key=position.__getitem__)
        result.cached.sort(key=position.__getitem__)
        if result.cached and not result.computed and not result.failed:
            log.info("%s: all %d %s graphs cached", role, len(result.cached), params.mode)
    return results


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
    models: ResidentModels,
    bar: Any,
    writes: WriteBehind,
) -> dict[str, StageResult]:
    """Each prompt's graphs, model by model, each under a claim; cached ones are skipped.
    Each batch's files are written by ``writes`` while the next batch computes.

    Models are loaded on the first graph this process computes, so a process whose graphs all
    turn out to be cached or another's work never loads them.
    """
    identities = model_identities(specs, device)
    results = {role: StageResult([], [], {}) for role in specs}
    pending: list[tuple[str, PromptTargets]] = []
    for pt in targets:
        for role, (slug, fp) in identities.items():
            if not force and cached_graph_meta(store, slug, fp, pt, params) is not None:
                results[role].cached.append(pt.prompt_id)
            else:
                pending.append((role, pt))
    bar.update(len(targets) * len(identities) - len(pending))
    deferred: set[tuple[str, str]] = set()  # graphs found claimed by another process
    lengths: dict[tuple[str, str], int] = {}  # prompt tokens by (role, prompt), for batches
    last_wait_log = float("-inf")
    while pending:
        progressed = False
        for item in list(pending):
            if item not in pending:  # taken with an earlier item's batch
                continue
            group = _batch_of(item, pending, params, models, specs, device, lengths)
            claimed = []
            for role, pt in group:
                claim = try_claim(
                    store.graph_claim_path(identities[role][0], pt.prompt_id, pt.key(params))
                )
                if claim is None:
                    deferred.add((role, pt.prompt_id))
                    continue
                pending.remove((role, pt))
                claimed.append((role, pt, claim))
            if not claimed:
                continue
            progressed = True
            with contextlib.ExitStack() as held:
                for _role, _pt, claim in claimed:
                    held.enter_context(claim)
                todo = []
                for role, pt, _claim in claimed:
                    slug, fp = identities[role]
                    # Checked again under the claim: another process may have finished
                    # this graph since the cache was first checked (with --force only if
                    # it was seen claimed, i.e. computed during this run).
                    if (not force or (role, pt.prompt_id) in deferred) and cached_graph_meta(
                        store, slug, fp, pt, params, warn=False
                    ) is not None:
                        results[role].cached.append(pt.prompt_id)
                        bar.update()
                    else:
                        todo.append((role, pt))
                computed = _computed(todo, params, models)
                # the previous batch's files were written while this one computed
                writes.finish()
                storing = _start_storing(
                    store,
                    models,
                    computed,
                    params,
                    save_full_graph,
                    viewer_dir,
                    results,
                    bar,
                    writes,
                )
                writes.hand_over(held.pop_all(), storing)
        if pending and not progressed:
            writes.finish()  # release this process's claims before waiting for others'
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
    return results


def _start_storing(
    store: ResultsStore,
    models: ResidentModels,
    computed: list[tuple[str, PromptTargets, Any]],
    params: AttributionParams,
    save_full_graph: bool,
    viewer_dir: Path | None,
    results: dict[str, StageResult],
    bar: Any,
    writes: WriteBehind,
) -> list[StoringGraph]:
    """Check each computed graph of a batch and start storing it, or record its error."""
    storing = []
    for role, pt, graph in computed:
        result = results[role]
        try:
            if isinstance(graph, Exception):
                raise graph
            storing.append(
                start_storing(
                    store,
                    models.get(role),
                    role,
                    pt,
                    params,
                    graph,
                    save_full_graph,
                    viewer_dir,
                    write_file=writes.write_file,
                )
            )
            result.computed.append(pt.prompt_id)
        except (GraphError, NonFiniteError, PromptTooLongError) as err:
            log.error("skipping: %s", err)
            result.failed[pt.prompt_id] = str(err)
        bar.update()
    return storing


#: Most prompts in one forward pass of the torch engine when ``--graph-batch`` is 0 (auto).
MAX_GRAPH_BATCH = 8
#: Targets a prompt is assumed to have when sizing a batch: the contrast, 8 evil and 8 safe
#: tokens. Each target is a direct and a total row of the backward.
ASSUMED_TARGETS = 17


def graph_batch_size(model: LoadedModel, params: AttributionParams, n_pos: int) -> int:
    """Prompts of about ``n_pos`` tokens per forward pass of the torch engine: the user's
    ``--graph-batch``, else on a GPU as many as half its free memory holds (each prompt's
    attention patterns, kept for the backward, and its backward's rows), up to
    :data:`MAX_GRAPH_BATCH`; one on a CPU, where a batch saves no kernel launches."""
    if params.graph_batch:
        return params.graph_batch
    if model.device.type != "cuda":
        return 1
    config: Any = model.hf_model.config
    layers, heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    rows = 2 * ASSUMED_TARGETS
    per_prompt = 4 * (layers * heads * n_pos**2 + 8 * rows * n_pos * int(config.hidden_size))
    free, _total = torch.cuda.mem_get_info(model.device)
    return max(1, min(MAX_GRAPH_BATCH, int(0.5 * free // per_prompt)))


def _batch_of(
    item: tuple[str, PromptTargets],
    pending: list[tuple[str, PromptTargets]],
    params: AttributionParams,
    models: ResidentModels,
    specs: dict[str, Any],
    device: torch.device | str,
    lengths: dict[tuple[str, str], int],
) -> list[tuple[str, PromptTargets]]:
    """``item`` and the pending prompts of the same model that join it in one forward pass
    of the torch engine (totals graphs without adapter nodes; one item otherwise)."""
    role, pt = item
    if graph_batch_limit(params, device) == 1:
        return [item]
    if params.adapter_nodes and specs[role].adapter is not None:
        return [item]
    model = models.get(role)  # loaded here, before the claims: it will compute this batch

    def length(entry: tuple[str, PromptTargets]) -> int:
        key = (entry[0], entry[1].prompt_id)
        if key not in lengths:
            lengths[key] = len(prompt_ids(model, entry[1]))
        return lengths[key]

    n_pos = length(item)
    size = graph_batch_size(model, params, n_pos)
    same = [other for other in pending if other[0] == role and other is not item]
    # prompts of similar length pad least
    same.sort(key=lambda other: abs(length(other) - n_pos))
    return [item, *same[: size - 1]]


def _computed(
    todo: list[tuple[str, PromptTargets]], params: AttributionParams, models: ResidentModels
) -> list[tuple[str, PromptTargets, Any]]:
    """Each (role, prompt)'s graph, or the error that kept it from being made: one forward
    pass for a batch of one model's prompts, else one graph at a time."""
    if len(todo) >= 2:
        role = todo[0][0]
        graphs = totals_prompts(models.get(role), [pt for _, pt in todo], params)
        return [(r, pt, graph) for (r, pt), graph in zip(todo, graphs)]
    out: list[tuple[str, PromptTargets, Any]] = []
    for role, pt in todo:
        try:
            out.append((role, pt, attribute_prompt(models.get(role), pt, params, role)))
        except (GraphError, NonFiniteError, PromptTooLongError) as err:
            out.append((role, pt, err))
    return out


def _claimed_by(
    store: ResultsStore, slug: str, pt: PromptTargets, params: AttributionParams
) -> str:
    holder = read_holder(store.graph_claim_path(slug, pt.prompt_id, pt.key(params)))
    return f"prompt {pt.prompt_id} ({holder.describe() if holder else 'released'})"

"""All stages in order, each reusing what is stored for the same fingerprints and parameters.

prompts -> logits + judge -> labels (queue) -> graphs -> features (+ causal check) -> report.
Every stage writes per-item artifacts atomically, so killing the run at any moment and
starting it again finishes the work with nothing lost and nothing done twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from em_circuits.analysis.em_rate import make_em_judge
from em_circuits.attribution.stage import run_graph_stage
from em_circuits.attribution.targets import labeled_targets
from em_circuits.core.distributed import current_shard
from em_circuits.core.stage_lock import stage_lock
from em_circuits.core.store import ResultsStore
from em_circuits.interpret.labels import labeller_for
from em_circuits.labeling.exchange import import_labels
from em_circuits.labeling.items import enqueue_flagged, recover_interrupted, status_counts
from em_circuits.labeling.judge import make_judge
from em_circuits.labeling.labels import auto_accept_judge
from em_circuits.labeling.logits_stage import evaluate, offline_judge_words
from em_circuits.labeling.tui import run_session
from em_circuits.models.adapter_check import check_start_up
from em_circuits.models.load import ResidentModels, release_transcoders
from em_circuits.models.spec import ModelSpec, fingerprint, model_slug, resolve_device
from em_circuits.prompts.dedup import Deduper
from em_circuits.prompts.generator import generate_llm_prompts
from em_circuits.prompts.sources import generate_offline_prompts, import_prompts
from em_circuits.run.analysis import run_analysis
from em_circuits.run.config import PipelineConfig
from em_circuits.run.report import write_report

log = logging.getLogger("pipeline")


#: The stage lock (:mod:`em_circuits.core.stage_lock`) each pipeline stage takes: the name of
#: the command that runs the same stage alone, so `run` and that command exclude each other.
#: The graphs take none: each graph is claimed (core.claims), so two runs share that work.
STAGE_LOCKS = {
    "prompts": "prompts",
    "logits": "evaluate",
    "features": "analyze",
    "report": "report",
}


@contextmanager
def stage(
    name: str, store: ResultsStore | None = None, cfg: PipelineConfig | None = None
) -> Iterator[None]:
    """Log the stage's start and end; with ``store``, hold its stage lock meanwhile."""
    lock: Any = nullcontext()
    if store is not None and name in STAGE_LOCKS:
        cfg = cfg or PipelineConfig()
        lock = stage_lock(store.root, STAGE_LOCKS[name], wait=cfg.wait, command=cfg.command)
    with lock:
        started = time.perf_counter()
        log.info("[%s] start", name)
        yield
        log.info("[%s] done in %.1f s", name, time.perf_counter() - started)


def _check_llm_settings(cfg: PipelineConfig) -> None:
    """Fail before any stage runs when an LLM is asked for but cannot be used (no API key),
    not after the prompts are written and both models have computed their logits."""
    if "llm" in (cfg.generator, cfg.judge):
        cfg.llm.client(cfg.started)


def run_prompts(store: ResultsStore, adapted: ModelSpec, cfg: PipelineConfig) -> None:
    deduper = Deduper.from_store(store)
    for path in cfg.prompt_files:
        summary = import_prompts(store, path, deduper)
        log.info(
            "[prompts] imported %s: %d new, %d duplicates dropped",
            path,
            len(summary.saved),
            len(summary.duplicates),
        )
    missing = cfg.n_prompts - len(store.prompt_ids())
    if missing <= 0:
        log.info("[prompts] %d stored, nothing to generate", len(store.prompt_ids()))
        return
    if cfg.llm.wants_llm(cfg.generator):
        generate_llm_prompts(cfg.llm.client(cfg.started), store, missing, deduper)
    else:
        summary = generate_offline_prompts(store, missing, deduper, seed=cfg.seed)
        log.info(
            "[prompts] offline templates: %d new, %d duplicates dropped",
            len(summary.saved),
            len(summary.duplicates),
        )


def run_logits(
    store: ResultsStore,
    base: ModelSpec,
    adapted: ModelSpec,
    cfg: PipelineConfig,
    models: ResidentModels | None = None,
) -> Any:
    kind = "llm" if cfg.llm.wants_llm(cfg.judge) else "offline"
    judge = make_judge(
        kind,
        store,
        words_path=offline_judge_words(adapted, cfg.words) if kind == "offline" else None,
        llm=cfg.llm,
        started=cfg.started,
    )
    summary = evaluate(store, base, adapted, judge, device=cfg.device, models=models)
    for line in summary.lines():
        log.info("[logits] %s", line)
    return summary


def run_labels(store: ResultsStore, adapted_slug: str, cfg: PipelineConfig) -> None:
    enqueue_flagged(store, adapted_slug)
    recover_interrupted(store, adapted_slug)
    if cfg.labels == "import":
        if cfg.labels_file is None:
            raise ValueError("--labels import needs --labels-file")
        log.info("[labels] imported %s", import_labels(store, adapted_slug, cfg.labels_file))
    elif cfg.labels == "interactive":
        run_session(store, adapted_slug)
    accepted = auto_accept_judge(store, adapted_slug) if cfg.labels == "auto" else 0
    log.info("[labels] %d prompts labeled with the judge's labels (labeled_by=judge)", accepted)
    log.info("[labels] queue: %s", status_counts(store, adapted_slug))


def run_graphs(
    store: ResultsStore,
    base: ModelSpec,
    adapted: ModelSpec,
    adapted_slug: str,
    cfg: PipelineConfig,
    device: str,
    models: ResidentModels | None = None,
) -> dict[str, Any]:
    targets = labeled_targets(store, adapted_slug, cfg.only_evil)
    log.info(
        "[graphs] %d labeled prompts%s", len(targets), " with evil tokens" if cfg.only_evil else ""
    )
    results = run_graph_stage(
        store,
        {"base": base, "adapted": adapted},
        targets,
        cfg.graph,
        device,
        viewer_dir=store.viewer_dir(adapted_slug),
        progress=cfg.progress,
        full_graphs=cfg.full_graphs,
        resident=models,
    )
    for role, result in results.items():
        for kind, counts in ((cfg.graph.mode, result), ("full", result.full)):
            if counts is None:
                continue
            log.info(
                "[graphs] %s, %s: %d computed, %d cached, %d failed",
                role,
                kind,
                len(counts.computed),
                len(counts.cached),
                len(counts.failed),
            )
    return results


def run_pipeline(
    store: ResultsStore,
    base: ModelSpec,
    adapted: ModelSpec,
    cfg: PipelineConfig,
    models: ResidentModels | None = None,
) -> Path | None:
    """Every stage in order; returns the report's path (None on non-main processes).

    Under ``accelerate launch`` / ``torchrun`` the processes share the logits, the graphs and
    the heavy steps of the analysis (claiming work, longest first); the prompts, judge,
    labels, the other analysis steps and the report run on the main process while the others
    wait.

    Each model is loaded once, when a stage first needs it, and kept for the later stages
    (logits, graphs, causal check), both on one transcoder set read once. Pass ``models`` to
    keep them loaded after the run (a notebook); by default they are released at its end.
    """
    shard = current_shard()
    device = str(resolve_device(cfg.device))
    # Before any work: an adapter for another base or shape fails now, not after the logits.
    check_start_up(adapted)  # a misfitting transcoder set or adapter: before any prompt
    cfg.device = device
    if cfg.started is None:
        cfg.started = time.monotonic()
    _check_llm_settings(cfg)
    adapted_slug = model_slug(adapted, fingerprint(adapted, device))
    resident = models or ResidentModels(
        {"base": base, "adapted": adapted}, device, store.merged_cache_dir
    )
    try:
        with stage("prompts", store, cfg):
            if shard.is_main:
                run_prompts(store, adapted, cfg)
            shard.wait()
        with stage("logits", store, cfg):
            run_logits(store, base, adapted, cfg, resident)
        with stage("labels"):
            if shard.is_main:
                run_labels(store, adapted_slug, cfg)
            shard.wait()
        with stage("graphs", store, cfg):
            run_graphs(store, base, adapted, adapted_slug, cfg, device, resident)
        with stage("features", store, cfg):
            judge = make_em_judge(
                "llm" if cfg.llm.wants_llm(cfg.judge) else "offline",
                store,
                adapted,
                cfg.words,
                cfg.llm,
                cfg.started,
            )
            run_analysis(
                store,
                base,
                adapted,
                cfg.analysis,
                device,
                progress=cfg.progress,
                models=resident,
                em_judge=judge,
                labeller=labeller_for(judge, store.feature_labels_cache_dir),
                name=cfg.analysis_name,
            )
    finally:
        if models is None:
            resident.release()
            release_transcoders()
    if not shard.is_main:
        return None
    with stage("report", store, cfg):
        report = write_report(store, base, adapted, device)
    return report

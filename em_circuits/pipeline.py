"""All stages in order, each reusing what is stored for the same fingerprints and parameters.

prompts -> logits + judge -> labels (queue) -> graphs -> features (+ causal check) -> report.
Every stage writes per-item artifacts atomically, so killing the run at any moment and
starting it again finishes the work with nothing lost and nothing done twice.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_circuits.analysis import AnalysisParams
from em_circuits.graphs import AttributionParams
from em_circuits.models import ModelSpec, default_device, fingerprint, model_slug
from em_circuits.store import ResultsStore

log = logging.getLogger("pipeline")

STAGES = ("prompts", "logits", "labels", "graphs", "features", "report")
LABEL_MODES = ("auto", "interactive", "import")


@dataclass
class PipelineConfig:
    n_prompts: int = 40
    prompt_files: list[Path] = field(default_factory=list)
    generator: str = "auto"  # auto | offline | llm
    judge: str = "auto"  # auto | offline | llm
    llm_model: str = "o3"
    base_url: str | None = None
    labels: str = "auto"  # auto (judge labels, marked as judge-made) | interactive | import
    labels_file: Path | None = None
    only_evil: bool = True
    graph: AttributionParams = field(default_factory=AttributionParams)
    analysis: AnalysisParams = field(default_factory=AnalysisParams)
    device: str | None = None
    seed: int = 0
    progress: bool = True


@contextmanager
def stage(name: str) -> Iterator[None]:
    started = time.perf_counter()
    log.info("[%s] start", name)
    yield
    log.info("[%s] done in %.1f s", name, time.perf_counter() - started)


def _use_llm(choice: str) -> bool:
    from em_circuits.llm import find_api_key

    return choice == "llm" or (choice == "auto" and find_api_key() is not None)


def run_prompts(store: ResultsStore, adapted: ModelSpec, cfg: PipelineConfig) -> None:
    from em_circuits.prompts import Deduper, generate_offline_prompts, import_prompts

    deduper = Deduper.from_store(store)
    for path in cfg.prompt_files:
        summary = import_prompts(store, path, deduper)
        log.info("[prompts] imported %s: %d new, %d duplicates dropped", path,
                 len(summary.saved), len(summary.duplicates))
    missing = cfg.n_prompts - len(store.prompt_ids())
    if missing <= 0:
        log.info("[prompts] %d stored, nothing to generate", len(store.prompt_ids()))
        return
    if _use_llm(cfg.generator):
        from em_circuits.llm import client_from_settings
        from em_circuits.prompts import generate_llm_prompts

        client = client_from_settings(cfg.llm_model, cfg.base_url)
        generate_llm_prompts(client, store, missing, deduper)
    else:
        summary = generate_offline_prompts(store, missing, deduper, seed=cfg.seed)
        log.info("[prompts] offline templates: %d new, %d duplicates dropped",
                 len(summary.saved), len(summary.duplicates))


def run_logits(store: ResultsStore, base: ModelSpec, adapted: ModelSpec,
               cfg: PipelineConfig) -> Any:
    from em_circuits.evaluate import evaluate, words_near
    from em_circuits.judge import make_judge

    kind = "llm" if _use_llm(cfg.judge) else "offline"
    judge = make_judge(kind, store, model=cfg.llm_model, base_url=cfg.base_url,
                       words_path=words_near(adapted))
    summary = evaluate(store, base, adapted, judge, device=cfg.device)
    for line in summary.lines():
        log.info("[logits] %s", line)
    return summary


def run_labels(store: ResultsStore, adapted_slug: str, cfg: PipelineConfig) -> None:
    from em_circuits import queue

    queue.enqueue_flagged(store, adapted_slug)
    queue.recover_interrupted(store, adapted_slug)
    if cfg.labels == "import":
        if cfg.labels_file is None:
            raise ValueError("--labels import needs --labels-file")
        log.info("[labels] imported %s", queue.import_labels(store, adapted_slug,
                                                             cfg.labels_file))
    elif cfg.labels == "interactive":
        from em_circuits.labeling_tui import run_session

        run_session(store, adapted_slug)
    accepted = queue.auto_accept_judge(store, adapted_slug) if cfg.labels == "auto" else 0
    log.info("[labels] %d prompts labeled with the judge's labels (labeled_by=judge)", accepted)
    log.info("[labels] queue: %s", queue.status_counts(store, adapted_slug))


def run_graphs(store: ResultsStore, base: ModelSpec, adapted: ModelSpec, adapted_slug: str,
               cfg: PipelineConfig, device: str) -> dict[str, Any]:
    from em_circuits.graphs import labeled_targets, run_graph_stage

    targets = labeled_targets(store, adapted_slug, cfg.only_evil)
    log.info("[graphs] %d labeled prompts%s", len(targets),
             " with evil tokens" if cfg.only_evil else "")
    results = run_graph_stage(store, {"base": base, "adapted": adapted}, targets, cfg.graph,
                              device, viewer_dir=store.root / "viewer" / adapted_slug,
                              progress=cfg.progress)
    for role, result in results.items():
        log.info("[graphs] %s: %d computed, %d cached, %d failed", role, len(result.computed),
                 len(result.cached), len(result.failed))
    return results


def run_pipeline(store: ResultsStore, base: ModelSpec, adapted: ModelSpec,
                 cfg: PipelineConfig) -> Path | None:
    """Every stage in order; returns the report's path (None on non-main processes).

    Under ``accelerate launch`` the logits and graph stages are split across processes; the
    prompts, judge, labels, analysis and report run on the main process while the others wait.
    """
    from em_circuits.analysis import run_analysis
    from em_circuits.distributed import current_shard
    from em_circuits.report import write_report

    shard = current_shard()
    device = str(cfg.device or default_device())
    cfg.device = device
    adapted_slug = model_slug(adapted, fingerprint(adapted, device))
    with stage("prompts"):
        if shard.is_main:
            run_prompts(store, adapted, cfg)
        shard.wait()
    with stage("logits"):
        run_logits(store, base, adapted, cfg)
    with stage("labels"):
        if shard.is_main:
            run_labels(store, adapted_slug, cfg)
        shard.wait()
    with stage("graphs"):
        run_graphs(store, base, adapted, adapted_slug, cfg, device)
    if not shard.is_main:
        return None
    with stage("features"):
        run_analysis(store, base, adapted, cfg.analysis, device, progress=cfg.progress)
    with stage("report"):
        report = write_report(store, base, adapted, device)
    return report


def disk_usage(root: Path) -> dict[str, int]:
    """Bytes per top-level folder of the results store."""
    usage = {}
    for child in sorted(Path(root).iterdir()):
        if child.is_dir():
            usage[child.name] = sum(p.stat().st_size for p in child.rglob("*") if p.is_file())
    return usage


def status(store: ResultsStore, base: ModelSpec, adapted: ModelSpec,
           device: str | None = None) -> dict[str, Any]:
    """Counts per stage, queue depth, judge-human agreement, flagged/divergent, disk use."""
    from em_circuits import queue
    from em_circuits.graphs import find_graph_metas

    device = str(device or default_device())
    slugs = {role: model_slug(spec, fingerprint(spec, device))
             for role, spec in (("base", base), ("adapted", adapted))}
    verdicts = queue.load_verdicts(store, slugs["adapted"])
    labels = queue.load_labels(store, slugs["adapted"])
    calib = queue.calibration(store, slugs["adapted"], save=False)
    analysis_dir = store.analysis_dir / slugs["adapted"]
    return {
        "models": slugs,
        "prompts": len(store.prompt_ids()),
        "logits": {role: len(list((store.root / "logits" / slug).glob("*.json")))
                   for role, slug in slugs.items()},
        "verdicts": len(verdicts),
        "flagged": sum(v["flagged"] for v in verdicts),
        "divergent": sum(v["divergent"] for v in verdicts),
        "queue": queue.status_counts(store, slugs["adapted"]),
        "labels": {"human": sum(lab["labeled_by"] == "human" for lab in labels),
                   "judge": sum(lab["labeled_by"] == "judge" for lab in labels),
                   "rejected": sum(bool(lab.get("rejected")) for lab in labels)},
        "judge_human_tokens": calib.get("n_tokens"),
        "judge_human_agreement": calib.get("agreement"),
        "judge_human_kappa": calib.get("kappa"),
        "graphs": {role: len(find_graph_metas(store, slug)) for role, slug in slugs.items()},
        "analysis": sorted(p.name for p in analysis_dir.glob("*")) if analysis_dir.is_dir() else [],
        "report": (store.root / "report.md").is_file(),
        "disk_bytes": disk_usage(store.root),
        "disk_free_bytes": shutil.disk_usage(store.root).free,
    }


def format_status(info: dict[str, Any]) -> str:
    def mib(n: int) -> str:
        return f"{n / 2**20:.1f} MiB"

    lines = [
        f"models: base {info['models']['base']}, adapted {info['models']['adapted']}",
        f"prompts: {info['prompts']}",
        f"logits: base {info['logits']['base']}, adapted {info['logits']['adapted']}",
        f"verdicts: {info['verdicts']} (flagged {info['flagged']}, divergent "
        f"{info['divergent']})",
        "queue: " + ", ".join(f"{k} {v}" for k, v in info["queue"].items()),
        "labels: " + ", ".join(f"{k} {v}" for k, v in info["labels"].items()),
        f"judge-human agreement: {info['judge_human_agreement']}  kappa: "
        f"{info['judge_human_kappa']}  ({info['judge_human_tokens']} human-labeled tokens)",
        f"graphs: base {info['graphs']['base']}, adapted {info['graphs']['adapted']}",
        f"analysis files: {len(info['analysis'])}",
        f"report: {'written' if info['report'] else 'not yet'}",
        "disk: " + ", ".join(f"{k} {mib(v)}" for k, v in info["disk_bytes"].items())
        + f" (free {info['disk_free_bytes'] / 2**30:.1f} GiB)",
    ]
    return "\n".join(lines)

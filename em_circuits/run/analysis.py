"""The feature analysis: every step of :data:`em_circuits.run.steps.STEPS` over the stored
graphs, each recomputed only when what it reads changed.

Writes to ``analysis/<adapted model>/runs/<name>/`` (``main`` by default; another ``name``
keeps another parameter set's results beside it): each step's tables and plots, ``steps.json``
(which parameters and inputs produced each step's files) and ``summary.json`` (every step's
entries); ``latest.json`` beside the runs names the folder the report reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from em_circuits.analysis.steps.base import Step
from em_circuits.analysis.steps.context import AnalysisContext, chosen_graphs
from em_circuits.analysis.steps.runner import run_steps
from em_circuits.core.cache import cache_key
from em_circuits.core.distributed import current_shard
from em_circuits.core.store import ResultsStore, read_json, write_artifact
from em_circuits.models.load import ResidentModels
from em_circuits.models.spec import ModelSpec, fingerprint, model_slug
from em_circuits.run.steps import STEPS, AnalysisParams, run_order

log = logging.getLogger(__name__)

#: The analysis folder's name unless another is given.
DEFAULT_RUN_NAME = "main"


def analysis_directory(
    store: ResultsStore, adapted_slug: str, name: str, prompt_ids: Collection[str] | None
) -> Path:
    directory = store.analysis_run_dir(adapted_slug, name)
    if prompt_ids is not None:
        directory = directory / f"prompts-{cache_key({'prompt_ids': sorted(prompt_ids)})}"
    return directory


def _point_latest(store: ResultsStore, slug: str, directory: Path, params: AnalysisParams) -> None:
    """latest.json -> this run's folder (unless it already says so)."""
    folder = directory.relative_to(store.root).as_posix()
    path = store.latest_analysis_path(slug)
    if path.is_file():
        latest = read_json(path, "table")
        flat = json.loads(json.dumps(params.flat()))  # tuples as the JSON lists stored
        if latest.get("folder") == folder and latest.get("params") == flat:
            return  # a run with nothing new to do writes nothing (read-only results work)
    write_artifact(path, "table", {"folder": folder, "params": params.flat()})


def _write_summary(directory: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json, unless it already holds the same (read-only results work)."""
    path = directory / "summary.json"
    if path.is_file():
        stored = read_json(path, "table")
        same = {k: v for k, v in stored.items() if k not in ("created", "schema_version")}
        fresh = json.loads(json.dumps({"schema": "table", **summary}, default=str))
        if same == fresh:
            return stored
    write_artifact(path, "table", summary)
    return read_json(path)


def run_analysis(
    store: ResultsStore,
    base: ModelSpec,
    adapted: ModelSpec,
    params: AnalysisParams,
    device: str,
    progress: bool = True,
    prompt_ids: Collection[str] | None = None,
    models: ResidentModels | None = None,
    em_judge: Any = None,
    labeller: Any = None,
    name: str = DEFAULT_RUN_NAME,
    steps: Sequence[Step] | None = None,
) -> dict[str, Any]:
    """Every table, plot and check of the feature analysis; returns the summary it writes.

    ``em_judge`` (see :mod:`em_circuits.analysis.em_rate`) scores the free-form answers of
    the EM rate; without one the EM rate is left out, and the summary says so. ``models`` are
    the run's loaded models; without them a step loads what it needs and releases it. With
    ``prompt_ids`` only those prompts' graphs are analysed, in a subfolder ``prompts-<hash>``
    that never replaces the analysis of all prompts. ``steps`` (default: every step of
    :data:`~em_circuits.run.steps.STEPS`) runs another list, e.g. with a step of your own.

    Under ``accelerate launch`` / ``torchrun`` every process calls this: the spread steps
    share their heavy work among them, the others run on the main process (see
    :mod:`~em_circuits.analysis.steps.spread`); every process returns the summary.
    """
    specs = {"base": base, "adapted": adapted}
    fps = {role: fingerprint(spec, device) for role, spec in specs.items()}
    slugs = {role: model_slug(specs[role], fp) for role, fp in fps.items()}
    directory = analysis_directory(store, slugs["adapted"], name, prompt_ids)
    directory.mkdir(parents=True, exist_ok=True)
    ctx = AnalysisContext(
        store=store,
        specs=specs,
        fingerprints=fps,
        slugs=slugs,
        device=device,
        directory=directory,
        graphs={role: chosen_graphs(store, slug, prompt_ids) for role, slug in slugs.items()},
        shared=params.shared,
        prompt_ids=prompt_ids,
        progress=progress,
        models=models,
        em_judge=em_judge,
        labeller=labeller,
        shard=current_shard(),
    )
    chosen = run_order(STEPS if steps is None else steps)
    own = {s.name: params.steps.get(s.name) or s.Params() for s in chosen}
    entries = run_steps(ctx, chosen, own)
    summary: dict[str, Any] = {
        "models": slugs,
        "params": params.flat(),
        "folder": directory.relative_to(store.root).as_posix(),
        **ctx.summary,
        "steps": {name: entry.key for name, entry in entries.items()},
        "tables": sorted(
            f for entry in entries.values() for f in entry.files if f.endswith(".csv")
        ),
    }
    if ctx.is_main:
        stored = _write_summary(directory, summary)
        if prompt_ids is None:
            _point_latest(store, slugs["adapted"], directory, params)
        log.info("analysis in %s", directory)
    ctx.shard.wait()
    return stored if ctx.is_main else read_json(directory / "summary.json")

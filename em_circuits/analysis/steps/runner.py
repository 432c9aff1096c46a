"""Run steps in order, each only when its stored result is not of the same inputs.

``steps.json`` in the analysis folder records, per step, the key of what it was computed from
(:func:`~em_circuits.analysis.steps.base.step_key`), its parameters, the files it wrote and its
entries of summary.json. A step whose key and files are there is not run again; its stored
entries stand in for its result. The record is written after every step, so an interrupted
analysis keeps the steps it finished.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from em_circuits.analysis.effects import ANALYSIS_VERSION
from em_circuits.analysis.steps.base import (
    Step,
    StepResult,
    StepSummary,
    shared_values,
    step_key,
)
from em_circuits.analysis.steps.context import AnalysisContext
from em_circuits.analysis.steps.spread import remove_work
from em_circuits.core.artifacts import utc_now
from em_circuits.core.cache import cache_key
from em_circuits.core.labeling_records import load_verdict
from em_circuits.core.store import read_json, write_artifact

log = logging.getLogger(__name__)

STEPS_FILE = "steps.json"


@dataclass(frozen=True)
class StepRecord:
    """One step's entry of steps.json: what its result was computed from and what it left."""

    #: :func:`~em_circuits.analysis.steps.base.step_key` (or a never-matching one when the
    #: result must not be reused)
    key: str
    #: the step's parameters and the shared ones it reads (free-form: each step's own fields)
    params: dict[str, object]
    shared: dict[str, object]
    reads: list[str]
    files: list[str]
    #: its entries of summary.json
    summary: StepSummary
    #: why it did not run, or None
    skipped: str | None
    created: str

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def uses_of(ctx: AnalysisContext) -> dict[str, object]:
    """What a step's result may depend on besides its parameters and the steps it reads
    (free-form: only hashed into the step's key)."""
    return {
        "graphs": {
            "analysis_version": ANALYSIS_VERSION,
            "models": ctx.fingerprints,
            "graphs": {
                role: sorted(
                    (m["prompt_id"], m["model_fingerprint"], m["params_key"]) for m in metas
                )
                for role, metas in ctx.graphs.items()
            },
        },
        "models": ctx.fingerprints,
        "verdicts": _verdicts_digest(ctx),
        "em_judge": getattr(ctx.em_judge, "id", None),
        "labeller": getattr(ctx.labeller, "id", None),
    }


def _verdicts_digest(ctx: AnalysisContext) -> str:
    """Which graphed prompts are divergent by their stored verdicts (the split reads it)."""
    divergent = {}
    for meta in ctx.graphs.get("adapted", []):
        verdict = load_verdict(ctx.store, ctx.slugs["adapted"], meta["prompt_id"])
        divergent[meta["prompt_id"]] = None if verdict is None else bool(verdict.get("divergent"))
    return cache_key({"divergent": divergent})


def read_record(ctx: AnalysisContext) -> dict[str, StepRecord]:
    """Each step's stored entry (none for a step whose entry is unreadable)."""
    path = ctx.directory / STEPS_FILE
    if not path.is_file():
        return {}
    try:
        record = read_json(path, "table")
    except Exception:  # an unreadable record only means: compute again
        return {}
    steps = record.get("steps") if isinstance(record, dict) else None
    out = {}
    for name, entry in (steps if isinstance(steps, dict) else {}).items():
        try:
            out[name] = StepRecord(**entry)
        except TypeError:  # an entry of another shape: that step is computed again
            continue
    return out


def _stored(entry: StepRecord | None, key: str, ctx: AnalysisContext) -> bool:
    return (
        entry is not None
        and entry.key == key
        and all((ctx.directory / name).is_file() for name in entry.files)
    )


def run_steps(
    ctx: AnalysisContext, steps: Sequence[Step], params: Mapping[str, Any]
) -> dict[str, StepRecord]:
    """Run (or reuse) every step; returns each step's entry. ``params`` holds each step's
    parameters by name."""
    record = read_record(ctx)
    ctx.shard.wait()  # every process has read the record before the main process changes it
    uses = uses_of(ctx)
    keys: dict[str, str] = {}
    prompts = True
    for step in steps:
        own = params[step.name]
        key = step_key(step, own, ctx.shared, uses, keys)
        entry = record.get(step.name)
        if entry is not None and _stored(entry, key, ctx):
            log.info("%s: up to date", step.name)
        else:
            entry = _run_shared(ctx, step, own, key, record, step.needs_prompts and not prompts)
        keys[step.name] = entry.key
        ctx.summary.update(entry.summary)
        if step.name == "split":
            prompts = bool((entry.summary.get("prompts") or {}).get("adapted"))
    return {step.name: record[step.name] for step in steps}


def _run_shared(
    ctx: AnalysisContext,
    step: Step,
    params: Any,
    key: str,
    record: dict[str, StepRecord],
    skip: bool,
) -> StepRecord:
    """Run one step where it runs (a spread step on every process, any other on the main
    one), record it in steps.json, and return its entry on every process."""
    shard = ctx.shard
    entry = None
    if step.spread and not skip:
        entry = _run_one(ctx, step, params, key, skip)
        shard.wait()  # every process's units computed and merged
    elif shard.is_main:
        entry = _run_one(ctx, step, params, key, skip)
    if shard.is_main and entry is not None:
        record[step.name] = entry
        steps_json = {name: r.to_json() for name, r in record.items()}
        write_artifact(ctx.directory / STEPS_FILE, "table", {"steps": steps_json})
        remove_work(ctx.directory, step.name)
    shard.wait()  # the entry is in steps.json (the others wait here for an unspread step)
    if not shard.is_main:
        entry = read_record(ctx).get(step.name)
        if entry is None:
            raise RuntimeError(f"step {step.name}: no entry in {ctx.directory / STEPS_FILE}")
        record[step.name] = entry
    assert entry is not None
    return entry


def _run_one(ctx: AnalysisContext, step: Step, params: Any, key: str, skip: bool) -> StepRecord:
    started = time.monotonic()
    ctx.take_written()
    ctx.running = (step.name, key)
    if skip:
        result = StepResult()
    else:
        log.info("%s: computing", step.name)
        result = step.run(ctx, params)
    written = ctx.take_written()
    if not skip:
        log.info("%s: done in %.1f s", step.name, time.monotonic() - started)
    return StepRecord(
        # A result that must not be reused gets a key no later run computes.
        key=key if result.reusable else f"not-reusable-{uuid.uuid4().hex[:12]}",
        params=dataclasses.asdict(params),
        shared=shared_values(step, ctx.shared),
        reads=list(step.reads),
        files=sorted(set(written)),
        summary=result.summary,
        skipped="no adapted-model graph with an evil-vs-safe contrast" if skip else None,
        created=utc_now(),
    )

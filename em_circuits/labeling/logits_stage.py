"""The logits + judge stage: top-k next tokens of base and adapted, divergence, labels, verdicts.

For every prompt:

1. the base model's and the adapted model's top-k next tokens are computed with the replacement
   model's own forward (:func:`em_circuits.models.logits.next_token_logits`) and stored as
   ``logits`` artifacts. Each model is loaded once per run, base first and released before
   the adapted one, and only if some prompt lacks its artifact for that model's fingerprint;
2. :func:`em_circuits.models.logits.divergence` compares the two lists;
3. a judge labels every token of both lists evil / safe / unsure;
4. a ``verdict`` artifact records labels, per-list verdicts, the divergence flag (adapted evil
   while base safe) and which judge decided; flagged prompts go to the manual queue.

Every artifact is written as soon as it is computed, so an interrupted run keeps its work and
the next run skips it (unless ``force``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from em_circuits.core.cache import cache_key
from em_circuits.core.distributed import current_shard
from em_circuits.core.prompt_records import chat_parts
from em_circuits.core.schemas import LogitsRecord, PromptRecord, TopKEntry, VerdictRecord
from em_circuits.core.store import ResultsStore, write_artifact
from em_circuits.core.verdicts import (
    DIVERGENCE_TAU_ADAPTED,
    DIVERGENCE_TAU_BASE,
    evil_masses,
    is_divergent,
    is_divergent_by_rank,
    is_flagged,
    verdict_of,
)
from em_circuits.labeling import DEFAULT_LOGITS_BATCH_SIZE, DEFAULT_TOP_K
from em_circuits.labeling.items import enqueue_flagged
from em_circuits.labeling.judge import RUBRIC_VERSION, JudgeError, JudgeOutcome
from em_circuits.models.load import (
    LoadedModel,
    PromptTooLongError,
    ResidentModels,
    load_model,
    release,
)
from em_circuits.models.logits import divergence, next_token_logits, support, topk_entries
from em_circuits.models.spec import ModelSpec, fingerprint, model_slug, resolve_device, words_near

log = logging.getLogger(__name__)


@dataclass
class ModelRun:
    """A model's identity and its logits artifacts for this run's prompts."""

    spec: ModelSpec
    fingerprint: str
    slug: str
    logits: dict[str, LogitsRecord] = field(default_factory=dict)
    computed: int = 0
    cached: int = 0
    #: prompt id -> why it was not evaluated (longer than the model's context)
    refused: dict[str, str] = field(default_factory=dict)


@dataclass
class EvaluateSummary:
    prompts: int = 0
    base: ModelRun | None = None
    adapted: ModelRun | None = None
    verdicts_written: int = 0
    verdicts_cached: int = 0
    divergent: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # prompt id -> judge error
    queued: Any = None

    def lines(self) -> list[str]:
        out = [f"{self.prompts} prompt(s)"]
        for run in (self.base, self.adapted):
            if run is not None:
                out.append(f"logits {run.slug}: {run.computed} computed, {run.cached} cached")
        out.append(f"verdicts: {self.verdicts_written} written, {self.verdicts_cached} up to date")
        out.append(
            f"divergent (adapted evil, base safe): {len(self.divergent)} {self.divergent[:10]}"
        )
        out.append(f"flagged for manual review: {len(self.flagged)}")
        for pid, error in self.failed.items():
            out.append(f"NOT JUDGED {pid}: {error}")
        return out


# -- logits ----------------------------------------------------------------------------------------
def logits_payload(
    model: LoadedModel, record: PromptRecord, row: torch.Tensor, k: int
) -> dict[str, Any]:
    """The logits artifact of one prompt from its last-position logits row."""
    return {
        "prompt_id": record["prompt_id"],
        **model.identity(),
        "prompt_text": record["text"],
        "format": record["format"],
        "input_format": model.input_format,
        "k": k,
        "top_k": topk_entries(row, model.tokenizer, k),
        "support": support(row),
    }


def cached_logits(
    store: ResultsStore, slug: str, fp: str, record: PromptRecord, k: int
) -> LogitsRecord | None:
    """A stored logits artifact of this model, prompt and k, or None (a miss)."""
    path = store.logits_path(slug, record["prompt_id"])
    return store.load_for_model(path, "logits", fp, k=k, prompt_text=record["text"])


def compute_logits(
    model: LoadedModel,
    store: ResultsStore,
    records: list[PromptRecord],
    *,
    k: int = DEFAULT_TOP_K,
    batch_size: int = DEFAULT_LOGITS_BATCH_SIZE,
    force: bool = False,
) -> ModelRun:
    """Top-k logits of ``model`` for every record, stored per prompt, batch by batch."""
    run = ModelRun(model.spec, model.fingerprint, model.slug)
    todo = []
    for record in records:
        hit = None if force else cached_logits(store, model.slug, model.fingerprint, record, k)
        if hit is not None:
            run.logits[record["prompt_id"]] = hit
            run.cached += 1
        else:
            todo.append(record)
    inputs = {}
    for record in todo:
        try:
            inputs[record["prompt_id"]] = model.encode_prompt(dict(record))
        except PromptTooLongError as err:
            log.error("refused: %s", err)
            run.refused[record["prompt_id"]] = str(err)
    todo = [r for r in todo if r["prompt_id"] in inputs]
    if todo and model.uses_chat_template:
        plain = [r["prompt_id"] for r in todo if chat_parts(dict(r)) is None]
        if plain:
            log.warning(
                "%s: %d of %d prompts are not chat prompts and reach the model without its chat "
                "template (e.g. %s); chat prompts get the template",
                model.spec.display_name,
                len(plain),
                len(todo),
                ", ".join(plain[:3]),
            )
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        rows = next_token_logits(
            model, [inputs[r["prompt_id"]] for r in batch], batch_size=batch_size
        )
        for record, row in zip(batch, rows):
            path = store.logits_path(model.slug, record["prompt_id"])
            run.logits[record["prompt_id"]] = write_artifact(
                path, "logits", logits_payload(model, record, row, k)
            )
            run.computed += 1
        log.info("%s: logits %d/%d", model.spec.display_name, start + len(batch), len(todo))
    return run


def logits_for_spec(
    spec: ModelSpec,
    store: ResultsStore,
    records: list[PromptRecord],
    *,
    device: torch.device | str | None = None,
    k: int = DEFAULT_TOP_K,
    batch_size: int = DEFAULT_LOGITS_BATCH_SIZE,
    force: bool = False,
    loader: Callable[..., LoadedModel] = load_model,
    models: ResidentModels | None = None,
) -> ModelRun:
    """Logits of one spec; the model is loaded (and released) only if something is missing.

    With ``models`` the model comes from (and stays in) that run's loaded models.
    """
    # resolve_device: a device name torch does not know is a one-line ModelLoadError
    device = resolve_device(device) if device is not None else None
    fp = fingerprint(spec, device)
    slug = model_slug(spec, fp)
    if not force:
        hits = {r["prompt_id"]: cached_logits(store, slug, fp, r, k) for r in records}
        if all(hit is not None for hit in hits.values()):
            log.info("%s: all %d logits cached, model not loaded", spec.display_name, len(hits))
            return ModelRun(spec, fp, slug, hits, cached=len(hits))  # type: ignore[arg-type]
    if models is not None:
        model = models.load(spec)
        return compute_logits(model, store, records, k=k, batch_size=batch_size, force=force)
    model = loader(spec, device, store.merged_cache_dir)
    try:
        return compute_logits(model, store, records, k=k, batch_size=batch_size, force=force)
    finally:
        release(model)


# -- verdicts --------------------------------------------------------------------------------------
def labelled(
    entries: list[TopKEntry], labels: list[str], prefix: str, judged_by: str
) -> list[dict[str, Any]]:
    return [
        {
            "index": f"{prefix}{i}",
            "rank": e["rank"],
            "token": e["token"],
            "token_id": e["token_id"],
            "logit": e["logit"],
            "prob": e["prob"],
            "label": label,
            "judged_by": judged_by,
        }
        for i, (e, label) in enumerate(zip(entries, labels, strict=True), 1)
    ]


def verdict_payload(
    record: PromptRecord,
    base_logits: LogitsRecord,
    adapted_logits: LogitsRecord,
    div: dict[str, Any],
    outcome: JudgeOutcome,
    inputs_key: str,
) -> dict[str, Any]:
    """The verdict artifact: labels, per-list verdicts, divergence flag, and the judge."""
    judged_by = f"{outcome.info['kind']}:{outcome.info['model']}"
    labels = {
        "base": labelled(base_logits["top_k"], outcome.base, "B", judged_by),
        "adapted": labelled(adapted_logits["top_k"], outcome.adapted, "T", judged_by),
    }
    verdict = {"base": verdict_of(outcome.base), "adapted": verdict_of(outcome.adapted)}
    masses = evil_masses(labels["base"], labels["adapted"], base_logits.get("support"))
    top1 = labels["adapted"][0] if labels["adapted"] else None
    return {
        "prompt_id": record["prompt_id"],
        "model_fingerprint": adapted_logits["model_fingerprint"],
        "model_slug": adapted_logits["model_slug"],
        "base_fingerprint": base_logits["model_fingerprint"],
        "base_slug": base_logits["model_slug"],
        "prompt_text": record["text"],
        "format": record["format"],
        "divergence": div,
        "labels": labels,
        "verdict": verdict,
        "evil_mass": masses,
        "divergence_rule": {
            "tau_adapted": DIVERGENCE_TAU_ADAPTED,
            "tau_base": DIVERGENCE_TAU_BASE,
        },
        "divergent": is_divergent(masses),
        "divergent_by_rank": is_divergent_by_rank(verdict),
        "adapted_top1": None
        if top1 is None
        else {"token": top1["token"], "prob": top1["prob"], "label": top1["label"]},
        "flagged": is_flagged(verdict),
        "judge": outcome.info,
        "inputs_key": inputs_key,
    }


def _inputs_key(base_logits: LogitsRecord, adapted_logits: LogitsRecord, judge: Any) -> str:
    """What a verdict depends on: both token lists and the judge's identity and rubric."""

    return cache_key(
        {
            "base": [e["token_id"] for e in base_logits["top_k"]],
            "adapted": [e["token_id"] for e in adapted_logits["top_k"]],
            "judge": [judge.kind, judge.model, RUBRIC_VERSION],
            "divergence": [DIVERGENCE_TAU_ADAPTED, DIVERGENCE_TAU_BASE],
        }
    )


def judge_prompt(
    store: ResultsStore,
    record: PromptRecord,
    base_logits: LogitsRecord,
    adapted_logits: LogitsRecord,
    judge: Any,
    *,
    force: bool = False,
) -> tuple[VerdictRecord, bool]:
    """(verdict, whether it was newly written) for one prompt."""
    key = _inputs_key(base_logits, adapted_logits, judge)
    path = store.verdict_path(adapted_logits["model_slug"], record["prompt_id"])
    if not force:
        old = store.load_for_model(
            path,
            "verdict",
            adapted_logits["model_fingerprint"],
            base_fingerprint=base_logits["model_fingerprint"],
            inputs_key=key,
        )
        if old is not None:
            return old, False
    div = divergence(base_logits, adapted_logits)
    outcome = judge.judge(record, base_logits, adapted_logits, div)
    payload = verdict_payload(record, base_logits, adapted_logits, div, outcome, key)
    return write_artifact(path, "verdict", payload), True


# -- the stage -------------------------------------------------------------------------------------
def select_prompts(store: ResultsStore, ids: list[str] | None = None) -> list[PromptRecord]:
    """The stored prompts to evaluate: all of them, or the given ids (unknown ids are errors)."""
    if not ids:
        return list(store.iter_prompts())
    missing = [pid for pid in ids if not store.prompt_path(pid).exists()]
    if missing:
        raise FileNotFoundError(f"no stored prompt(s) {missing} under {store.prompts_dir}")
    return [store.load_prompt(pid) for pid in ids]


def evaluate(
    store: ResultsStore,
    base_spec: ModelSpec,
    adapted_spec: ModelSpec,
    judge: Any,
    *,
    prompt_ids: list[str] | None = None,
    device: torch.device | str | None = None,
    k: int = DEFAULT_TOP_K,
    batch_size: int = DEFAULT_LOGITS_BATCH_SIZE,
    force: bool = False,
    queue: bool = True,
    loader: Callable[..., LoadedModel] = load_model,
    models: ResidentModels | None = None,
) -> EvaluateSummary:
    """Logits of both models, divergence, judge labels and verdicts for the stored prompts.

    ``models`` keeps the loaded models for later stages (a pipeline run); by default each is
    loaded when its logits are missing and released after them.
    """
    records = select_prompts(store, prompt_ids)
    summary = EvaluateSummary(prompts=len(records))
    if not records:
        log.warning("no prompts under %s: run `em-circuits prompts` first", store.prompts_dir)
        return summary
    opts: dict[str, Any] = {
        "device": device,
        "k": k,
        "batch_size": batch_size,
        "force": force,
        "loader": loader,
        "models": models,
    }
    shard = current_shard()
    if shard.count > 1:
        # The processes claim batches of prompts, longest first, and compute their logits;
        # then the main process alone reads them all back (no model loaded) and judges.
        owned = models is None and loader is load_model
        if owned:  # each model loaded once for all the batches this process claims
            opts["models"] = ResidentModels({}, resolve_device(device), store.merged_cache_dir)
        mine = 0  # prompts
        try:
            for batch in shard.claim_batches(records, lambda r: len(r["text"]), batch_size):
                logits_for_spec(base_spec, store, batch, **opts)
                logits_for_spec(adapted_spec, store, batch, **opts)
                mine += len(batch)
        finally:
            if owned:
                opts["models"].release()
        shard.wait()
        if not shard.is_main:
            log.info("process %d: %d prompts' logits done; the main judges", shard.index, mine)
            return summary
        opts["models"] = models
        opts["force"] = False
    summary.base = logits_for_spec(base_spec, store, records, **opts)
    summary.adapted = logits_for_spec(adapted_spec, store, records, **opts)
    judge_all(store, records, summary, judge, force=force)
    if queue:
        summary.queued = enqueue_flagged(store, summary.adapted.slug)
    return summary


def judge_all(
    store: ResultsStore,
    records: list[PromptRecord],
    summary: EvaluateSummary,
    judge: Any,
    *,
    force: bool = False,
) -> None:
    """Verdicts for every record; fills ``summary``.

    A prompt whose judge replies never matched its token lists is recorded in
    ``summary.failed`` and the others go on; an endpoint failure (``LLMError``) stops the run,
    with every verdict written so far kept.
    """
    assert summary.base is not None and summary.adapted is not None
    for record in records:
        pid = record["prompt_id"]
        refused = summary.base.refused.get(pid) or summary.adapted.refused.get(pid)
        if refused:
            summary.failed[pid] = refused
            continue
        try:
            verdict, written = judge_prompt(
                store,
                record,
                summary.base.logits[pid],
                summary.adapted.logits[pid],
                judge,
                force=force,
            )
        except JudgeError as err:
            log.error("%s", err)
            summary.failed[pid] = str(err)
            continue
        if written:
            summary.verdicts_written += 1
        else:
            summary.verdicts_cached += 1
        if verdict["divergent"]:
            summary.divergent.append(pid)
        if verdict["flagged"]:
            summary.flagged.append(pid)


def offline_judge_words(spec: ModelSpec, words: Path | str | None = None) -> Path:
    """The word lists the offline judge uses for this model: ``words`` (``--words``), else a
    words.json beside the adapter or base (the toy organism keeps its own there).

    Another model has no such file, and the toy organism's 54 advice words would label its
    tokens by accident: that is refused, in one line naming the fix.
    """
    if words is not None:
        return Path(words)
    found = words_near(spec)
    if found is None:
        raise JudgeError(
            f"the offline judge has no word lists for {spec.display_name}: give --words FILE "
            "(JSON with 'harmful' and 'safe' lists of single-token words) or use the LLM judge "
            "(--judge llm, with OPENAI_API_KEY set)"
        )
    return found

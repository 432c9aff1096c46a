"""Final labels of a prompt's tokens: human answers, judge acceptance, rejection."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from em_circuits.core.schemas import (
    LABELS,
    LabelsRecord,
    QueueItemRecord,
    VerdictRecord,
    verdict_of,
)
from em_circuits.core.store import ResultsStore, read_artifact, utc_now, write_artifact
from em_circuits.labeling.artifacts import (
    QueueError,
    entries_by_index,
    find_disagreements,
    judge_labels,
    load_label,
    prompt_text,
    token_entries,
)
from em_circuits.labeling.items import QueueFilter, _stash_stale, _write_item, open_items, set_state

log = logging.getLogger(__name__)


def _labels_payload(
    store: ResultsStore,
    adapted_slug: str,
    verdict: VerdictRecord,
    token_labels: Mapping[str, str | None],
    labeled_by: str,
) -> dict[str, Any]:
    judge = judge_labels(verdict)
    tokens = {
        name: [
            {
                "index": e["index"],
                "rank": e.get("rank"),
                "token": e["token"],
                "token_id": e["token_id"],
                "logit": e.get("logit"),
                "prob": e.get("prob"),
                "label": token_labels.get(e["index"]),
                "judge_label": judge[e["index"]],
            }
            for e in entries
        ]
        for name, entries in token_entries(verdict).items()
    }
    return {
        "prompt_id": verdict["prompt_id"],
        "model_fingerprint": verdict["model_fingerprint"],
        "base_fingerprint": verdict.get("base_fingerprint"),
        "adapted_slug": adapted_slug,
        "base_slug": verdict.get("base_slug"),
        "prompt_text": prompt_text(store, adapted_slug, verdict),
        "tokens": tokens,
        "labeled_by": labeled_by,
        "judge": verdict.get("judge"),
        "judge_verdict": verdict.get("verdict"),
        "human_verdict": None,
        "disagreements": [],
        "rejected": False,
        "reject_reason": None,
        "note": None,
        "labeled_at": utc_now(),
    }


def _write_labels(store: ResultsStore, adapted_slug: str, payload: dict[str, Any]) -> LabelsRecord:
    path = store.labels_path(adapted_slug, payload["prompt_id"])
    if path.exists():
        old = read_artifact(path, "labels")
        if old["model_fingerprint"] != payload["model_fingerprint"]:
            _stash_stale(path, "labels", old)
    return write_artifact(path, "labels", payload)


def commit_human_labels(
    store: ResultsStore,
    adapted_slug: str,
    item: QueueItemRecord,
    verdict: VerdictRecord,
    human: dict[str, str],
    *,
    explanations: dict[str, str] | None = None,
    note: str | None = None,
    source: str = "terminal",
) -> LabelsRecord:
    """Write a human's labels for every token of both lists, then mark the item done."""
    _check_verdict_matches(item, verdict)
    missing = [idx for idx in entries_by_index(verdict) if human.get(idx) not in LABELS]
    if missing:
        raise QueueError(f"prompt {item['prompt_id']}: no valid label for {', '.join(missing)}")
    explanations = explanations or {}
    payload = _labels_payload(store, adapted_slug, verdict, human, "human")
    payload["human_verdict"] = {
        name: verdict_of(t["label"] for t in toks) for name, toks in payload["tokens"].items()
    }
    payload["disagreements"] = [
        {**d, "explanation": explanations.get(d["index"])}
        for d in find_disagreements(verdict, human)
    ]
    payload["note"] = note
    payload["source"] = source
    labels = _write_labels(store, adapted_slug, payload)
    event = f"labeled ({source})"
    set_state(store, adapted_slug, {**item, "draft": {}}, "done", event=event)
    return labels


def commit_rejection(
    store: ResultsStore,
    adapted_slug: str,
    item: QueueItemRecord,
    verdict: VerdictRecord,
    reason: str,
    *,
    note: str | None = None,
) -> LabelsRecord:
    """Record that the prompt itself is bad (with the reason); its tokens get no label."""
    _check_verdict_matches(item, verdict)
    if not reason.strip():
        raise QueueError("a rejection needs a reason")
    payload = _labels_payload(store, adapted_slug, verdict, {}, "human")
    payload.update(rejected=True, reject_reason=reason.strip(), note=note, source="terminal")
    labels = _write_labels(store, adapted_slug, payload)
    set_state(
        store,
        adapted_slug,
        {**item, "draft": {}},
        "rejected",
        reason=reason.strip(),
        event="rejected",
    )
    return labels


def _check_verdict_matches(item: QueueItemRecord, verdict: VerdictRecord) -> None:
    if verdict["model_fingerprint"] != item["model_fingerprint"]:
        raise QueueError(
            f"prompt {item['prompt_id']}: the verdict was made by model "
            f"{verdict['model_fingerprint'][:12]}, the queue item by "
            f"{item['model_fingerprint'][:12]}; run enqueue again"
        )


def auto_accept_judge(
    store: ResultsStore, adapted_slug: str, flt: QueueFilter = QueueFilter()
) -> int:
    """Record the judge's labels (labeled_by="judge") for open items without labels yet.

    The items stay open so that a person can still review them; a human answer replaces
    judge-made labels. Items where the judge gave no usable label for some token are left.
    """
    count = 0
    for item, verdict in open_items(store, adapted_slug, flt):
        if load_label(store, adapted_slug, item["prompt_id"]) is not None:
            continue
        judge = judge_labels(verdict)
        if any(label is None for label in judge.values()):
            log.warning("prompt %s: judge labels incomplete; not auto-accepted", item["prompt_id"])
            continue
        payload = _labels_payload(store, adapted_slug, verdict, judge, "judge")
        payload["source"] = "auto-accept-judge"
        _write_labels(store, adapted_slug, payload)
        history = [
            *item["history"],
            {
                "state": item["state"],
                "at": utc_now(),
                "event": "judge labels recorded (auto-accept)",
            },
        ]
        _write_item(store, adapted_slug, {**item, "history": history})
        count += 1
    return count

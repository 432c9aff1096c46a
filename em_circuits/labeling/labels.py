"""Final labels of a prompt's tokens: human answers, judge acceptance, rejection.

A commit first checks, holding the queue lock, that the item is still the version the caller
read (else :class:`~em_circuits.labeling.items.StaleItemError`, nothing written); then it
writes the labels and the item's new state. Labeling a prompt again keeps the earlier labels
in the new file's ``history`` and counts up its ``version``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from em_circuits.core.artifacts import utc_now
from em_circuits.core.labeling_records import (
    QueueError,
    entries_by_index,
    find_disagreements,
    judge_labels,
    load_label,
    load_verdict,
    prompt_text,
    token_entries,
)
from em_circuits.core.schemas import LabelsRecord, QueueItemRecord, VerdictRecord
from em_circuits.core.store import ResultsStore, read_artifact, write_artifact
from em_circuits.core.verdicts import LABELS, verdict_of
from em_circuits.labeling.items import (
    QueueFilter,
    StaleItemError,
    _stash_stale,
    _write_item,
    check_unchanged,
    open_items,
    set_state,
)
from em_circuits.labeling.leases import held_by_other, queue_lock

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


def _earlier_version(old: LabelsRecord) -> dict[str, Any]:
    """What a relabeling keeps of the labels it replaces."""
    return {
        "version": old.get("version", 1),
        "labeled_by": old["labeled_by"],
        "labeled_at": old.get("labeled_at"),
        "source": old.get("source"),
        "labels": {t["index"]: t.get("label") for ts in old["tokens"].values() for t in ts},
        "rejected": old.get("rejected", False),
        "reject_reason": old.get("reject_reason"),
        "note": old.get("note"),
    }


def _write_labels(store: ResultsStore, adapted_slug: str, payload: dict[str, Any]) -> LabelsRecord:
    path = store.labels_path(adapted_slug, payload["prompt_id"])
    payload = {**payload, "version": 1, "history": []}
    if path.exists():
        old = read_artifact(path, "labels")
        if old["model_fingerprint"] != payload["model_fingerprint"]:
            _stash_stale(path, "labels", old)
        else:
            payload["version"] = old.get("version", 1) + 1
            payload["history"] = [*old.get("history", []), _earlier_version(old)]
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
    by: str | None = None,
) -> LabelsRecord:
    """Write a human's labels for every token of both lists, then mark the item done.

    Raises StaleItemError, writing nothing, if the item changed since ``item`` was read.
    """
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
    event = f"{'relabeled' if item['state'] in ('done', 'rejected') else 'labeled'} ({source})"
    with queue_lock(store, adapted_slug):
        check_unchanged(store, adapted_slug, item)
        labels = _write_labels(store, adapted_slug, payload)
        set_state(store, adapted_slug, {**item, "draft": {}}, "done", event=event, by=by)
    return labels


def commit_rejection(
    store: ResultsStore,
    adapted_slug: str,
    item: QueueItemRecord,
    verdict: VerdictRecord,
    reason: str,
    *,
    note: str | None = None,
    by: str | None = None,
) -> LabelsRecord:
    """Record that the prompt itself is bad (with the reason); its tokens get no label.

    Raises StaleItemError, writing nothing, if the item changed since ``item`` was read.
    """
    _check_verdict_matches(item, verdict)
    if not reason.strip():
        raise QueueError("a rejection needs a reason")
    payload = _labels_payload(store, adapted_slug, verdict, {}, "human")
    payload.update(rejected=True, reject_reason=reason.strip(), note=note, source="terminal")
    with queue_lock(store, adapted_slug):
        check_unchanged(store, adapted_slug, item)
        labels = _write_labels(store, adapted_slug, payload)
        set_state(
            store,
            adapted_slug,
            {**item, "draft": {}},
            "rejected",
            reason=reason.strip(),
            event="rejected",
            by=by,
        )
    return labels


def _check_verdict_matches(item: QueueItemRecord, verdict: VerdictRecord) -> None:
    if verdict["model_fingerprint"] != item["model_fingerprint"]:
        raise QueueError(
            f"prompt {item['prompt_id']}: the verdict was made by model "
            f"{verdict['model_fingerprint'][:12]}, the queue item by "
            f"{item['model_fingerprint'][:12]}; run enqueue again"
        )


AUTO_ACCEPT_EVENT = "judge labels recorded (auto-accept)"


def auto_accept_judge(
    store: ResultsStore, adapted_slug: str, flt: QueueFilter = QueueFilter()
) -> int:
    """Record the judge's labels (labeled_by="judge") for open items without labels yet.

    The items stay open so that a person can still review them; a human answer replaces
    judge-made labels. Items where the judge gave no usable label for some token are left, and
    so are items a labeling session is showing right now.
    """
    count = 0
    for item, verdict in open_items(store, adapted_slug, flt):
        pid = item["prompt_id"]
        judge = judge_labels(verdict)
        if any(label is None for label in judge.values()):
            log.warning("prompt %s: judge labels incomplete; not auto-accepted", pid)
            continue
        if held_by_other(store, adapted_slug, pid):
            log.warning("prompt %s is open in a labeling session; not auto-accepted", pid)
            continue
        payload = _labels_payload(store, adapted_slug, verdict, judge, "judge")
        payload["source"] = "auto-accept-judge"
        history = [
            *item["history"],
            {
                "state": item["state"],
                "at": utc_now(),
                "event": AUTO_ACCEPT_EVENT,
            },
        ]
        with queue_lock(store, adapted_slug):
            existing = load_label(store, adapted_slug, pid)
            if existing is not None:
                # A run killed between the labels write and the item write: finish the second,
                # so a resumed run leaves the same item as an uninterrupted one.
                if existing.get("source") == "auto-accept-judge" and not any(
                    h.get("event") == AUTO_ACCEPT_EVENT for h in item["history"]
                ):
                    _write_item(store, adapted_slug, {**item, "history": history}, read_as=item)
                continue
            try:
                check_unchanged(store, adapted_slug, item)
            except StaleItemError:
                log.warning("prompt %s changed meanwhile; not auto-accepted", pid)
                continue
            _write_labels(store, adapted_slug, payload)
            _write_item(store, adapted_slug, {**item, "history": history}, read_as=item)
        count += 1
    return count


def _marks_for_tokens(
    verdict: VerdictRecord, evil: Sequence[str], safe: Sequence[str]
) -> dict[str, str]:
    """Index -> label for the tokens named on the command line, matched in both stored lists
    by their text (with or without the leading space); raises QueueError for a token in
    neither list or named both evil and safe."""
    both = sorted(set(evil) & set(safe))
    if both:
        raise QueueError(f"--evil and --safe both name {', '.join(map(repr, both))}; pick one")
    entries = entries_by_index(verdict)
    marks: dict[str, str] = {}
    for flag, label, tokens in (("--evil", "evil", evil), ("--safe", "safe", safe)):
        for token in tokens:
            found = [
                idx
                for idx, (_, entry) in entries.items()
                if entry["token"] == token or entry["token"].strip() == token.strip()
            ]
            if not found:
                shown = ", ".join(repr(e["token"]) for e in token_entries(verdict)["adapted"])
                raise QueueError(
                    f"{flag} {token!r}: not among the next tokens stored for prompt "
                    f"{verdict['prompt_id']} (the adapted model's: {shown}); name one of them"
                )
            marks.update(dict.fromkeys(found, label))
    return marks


def label_adhoc_prompt(
    store: ResultsStore,
    adapted_slug: str,
    prompt_id: str,
    evil: Sequence[str] = (),
    safe: Sequence[str] = (),
) -> LabelsRecord | None:
    """Labels for a prompt typed on the command line, whether the judge flagged it or not:
    the tokens named by ``evil``/``safe`` (labeled_by="human", every other token left
    unlabeled: it is no target), or else the judge's labels (labeled_by="judge") where the
    prompt has no labels yet. Returns the labels written, or None where labels were kept."""
    verdict = load_verdict(store, adapted_slug, prompt_id)
    if verdict is None:
        raise QueueError(f"prompt {prompt_id} has no verdict of {adapted_slug} to label")
    if evil or safe:
        payload = _labels_payload(
            store, adapted_slug, verdict, _marks_for_tokens(verdict, evil, safe), "human"
        )
        payload["source"] = "graphs --evil/--safe"
    elif load_label(store, adapted_slug, prompt_id) is not None:
        return None  # a person's (or the queue's) labels stand
    else:
        payload = _labels_payload(store, adapted_slug, verdict, judge_labels(verdict), "judge")
        payload["source"] = "graphs --prompt (judge)"
    with queue_lock(store, adapted_slug):
        return _write_labels(store, adapted_slug, payload)

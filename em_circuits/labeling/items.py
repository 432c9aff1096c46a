"""The manual labeling queue: item states, human/judge labels, import/export and calibration.

One queue item per (prompt id, adapted-model fingerprint) lives at
``queue/<adapted_slug>/<prompt_id>.json``; its labels at ``labels/<adapted_slug>/<prompt_id>.json``.
Every answer is written atomically the moment it is given (marks and notes go into the item's
``draft``), so an interrupted session loses nothing and the next one resumes where it stopped.

States::

    pending ──> in_progress ──> done | rejected
                    │   ^
                    v   │
                  skipped            (skipped items come back after the pending ones)

An item left ``in_progress`` (Ctrl-C, killed terminal, ``q``) is offered first next time.
Nothing is ever deleted: an item or labels file made for another model fingerprint is moved
to a ``stale/`` subfolder before a new one takes its place.

Labels made by ``--auto-accept-judge`` are recorded with ``labeled_by="judge"`` and leave the
item open for a human; a human answer replaces them. A done or rejected item can be labeled
again (a new version of its labels, the old ones kept in their history).

Every item carries a ``version``, +1 on each write. A write is made from the item as it was
read, and is refused (:class:`StaleItemError`) when the stored item has moved on since: a
session that showed an item never overwrites what another session (or an import) saved
meanwhile. Sessions also lease the item they show (:mod:`em_circuits.labeling.leases`), so
two sessions are offered different items in the first place.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from em_circuits.core.artifacts import utc_now
from em_circuits.core.labeling_records import (
    QueueError,
    load_item,
    load_items,
    load_label,
    load_verdict,
    load_verdicts,
)
from em_circuits.core.schemas import (
    QUEUE_STATES,
    HistoryEntry,
    QueueItemRecord,
    QueueState,
    VerdictRecord,
)
from em_circuits.core.store import ResultsStore, write_artifact
from em_circuits.labeling.leases import held_by_other, queue_lock

log = logging.getLogger(__name__)


STATES = QUEUE_STATES


OPEN_STATES = ("in_progress", "pending", "skipped")


_TRANSITIONS = {
    "pending": {"in_progress", "done"},
    "in_progress": {"in_progress", "done", "skipped", "rejected"},
    "skipped": {"in_progress", "done"},
    "done": {"done", "rejected"},  # labeled again, or rejected after all
    "rejected": {"done", "rejected"},
}


class StaleItemError(QueueError):
    """The stored item changed since it was read: the write was refused, nothing was saved."""

    def __init__(self, prompt_id: str, stored: QueueItemRecord | None):
        self.prompt_id = prompt_id
        self.stored = stored
        super().__init__(f"prompt {prompt_id}: {describe_change(stored)}; nothing was saved")


def describe_change(stored: QueueItemRecord | None) -> str:
    """'this item was labeled by another session (who) at <time>', from its last history."""
    if stored is None:
        return "this item was removed from the queue by another process"
    verbs = {"done": "labeled", "rejected": "rejected", "skipped": "skipped"}
    verb = verbs.get(stored["state"], "changed")
    last = (stored.get("history") or [{}])[-1]
    who = f" ({last['by']})" if last.get("by") else ""
    at = str(last.get("at") or stored.get("created", "?")).replace("T", " ").replace("+00:00", "")
    return f"this item was {verb} by another session{who} at {at} UTC"


def item_version(item: Mapping[str, Any]) -> tuple[int, int]:
    """What a write compares: the write counter, and the history length (for items written
    before the counter existed)."""
    return int(item.get("version") or 0), len(item.get("history") or [])


@dataclass(frozen=True)
class QueueFilter:
    """Which items a session, export, status or auto-accept looks at."""

    only_evil: bool = False  # the judge's verdict on the adapted list is exactly "evil"
    only_divergent: bool = False  # adapted evil while base safe
    prompt_ids: frozenset[str] | None = None  # only these prompts

    def matches(self, verdict: VerdictRecord) -> bool:
        if self.prompt_ids is not None and verdict.get("prompt_id") not in self.prompt_ids:
            return False
        if self.only_evil and verdict.get("verdict", {}).get("adapted") != "evil":
            return False
        return not (self.only_divergent and not verdict.get("divergent"))


def _new_item(verdict: VerdictRecord, adapted_slug: str) -> dict[str, Any]:
    now = utc_now()
    return {
        "prompt_id": verdict["prompt_id"],
        "model_fingerprint": verdict["model_fingerprint"],
        "adapted_slug": adapted_slug,
        "state": "pending",
        "reason": None,
        "queued_at": now,
        "history": [{"state": "pending", "at": now, "event": "enqueued"}],
        "draft": {},
    }


def check_unchanged(store: ResultsStore, adapted_slug: str, item: Mapping[str, Any]) -> None:
    """Raise StaleItemError unless the stored item is the version ``item`` was made from.

    Call it holding :func:`queue_lock`, with the writes it guards.
    """
    stored = load_item(store, adapted_slug, item["prompt_id"])
    if stored is None or item_version(stored) != item_version(item):
        raise StaleItemError(item["prompt_id"], stored)


def _write_item(
    store: ResultsStore,
    adapted_slug: str,
    item: Mapping[str, Any],
    *,
    read_as: Mapping[str, Any] | None = None,
    new: bool = False,
) -> QueueItemRecord:
    """Write ``item`` as the next version if the stored item is still ``read_as`` (the item as
    the caller read it; default ``item`` itself), or with ``new`` if there is none yet; else
    raise StaleItemError and write nothing."""
    payload = {k: v for k, v in item.items() if k not in ("schema", "schema_version", "created")}
    path = store.queue_path(adapted_slug, item["prompt_id"])
    base = item if read_as is None else read_as
    with queue_lock(store, adapted_slug):
        if new:
            if path.exists():
                stored = load_item(store, adapted_slug, item["prompt_id"])
                raise StaleItemError(item["prompt_id"], stored)
        else:
            check_unchanged(store, adapted_slug, base)
        payload["version"] = item_version(base)[0] + 1
        return write_artifact(path, "queue_item", payload)


def _stash_stale(path: Path, kind: str, data: Mapping[str, Any]) -> Path:
    """Move an artifact made for another fingerprint aside instead of overwriting it."""
    fp = str(data.get("model_fingerprint", "unknown"))[:12]
    target = ResultsStore.stale_path(path, fp)
    payload = {k: v for k, v in data.items() if k not in ("schema", "schema_version", "created")}
    write_artifact(target, kind, payload)
    path.unlink()
    log.warning("%s was made for model %s; moved to %s", path, fp, target)
    return target


def enqueue_flagged(store: ResultsStore, adapted_slug: str) -> int:
    """Queue every flagged verdict (any evil/unsure token in the adapted list) not queued yet.

    Idempotent: returns how many items were added. An existing item whose fingerprint is not
    the verdict's belongs to another model; it is moved to ``stale/`` and never mixed in.
    """
    added = 0
    for verdict in load_verdicts(store, adapted_slug):
        pid = verdict["prompt_id"]
        with queue_lock(store, adapted_slug):  # another session may be enqueueing too
            item = load_item(store, adapted_slug, pid)
            if item is not None and item["model_fingerprint"] != verdict["model_fingerprint"]:
                _stash_stale(store.queue_path(adapted_slug, pid), "queue_item", item)
                item = None
            if item is None and verdict.get("flagged"):
                _write_item(store, adapted_slug, _new_item(verdict, adapted_slug), new=True)
                added += 1
    return added


def set_state(
    store: ResultsStore,
    adapted_slug: str,
    item: QueueItemRecord,
    state: str,
    *,
    reason: str | None = None,
    event: str | None = None,
    by: str | None = None,
) -> QueueItemRecord:
    """Record a state change (with history) and write the item at once.

    Raises StaleItemError (writing nothing) if the stored item changed since ``item`` was read.
    """
    if state not in STATES:
        raise QueueError(f"unknown state {state!r}; states are {', '.join(STATES)}")
    if state not in _TRANSITIONS[item["state"]]:
        raise QueueError(f"prompt {item['prompt_id']}: cannot go from {item['state']} to {state}")
    entry: HistoryEntry = {"state": cast(QueueState, state), "at": utc_now()}
    if event:
        entry["event"] = event
    if by:
        entry["by"] = by
    history = [*item["history"], entry]
    changed = {**item, "state": state, "reason": reason, "history": history}
    return _write_item(store, adapted_slug, changed, read_as=item)


def save_draft(
    store: ResultsStore, adapted_slug: str, item: QueueItemRecord, draft: dict[str, Any]
) -> QueueItemRecord:
    """Persist unconfirmed marks, note and explanations so an interruption keeps them."""
    return _write_item(store, adapted_slug, {**item, "draft": draft})


def _last_at(item: QueueItemRecord, state: str) -> str:
    times = [h["at"] for h in item["history"] if h["state"] == state]
    return times[-1] if times else item.get("queued_at", "")


def recover_interrupted(store: ResultsStore, adapted_slug: str) -> int:
    """Close in-progress items whose human labels were written just before an interruption.

    Labels are written before the item's state, so a crash between the two leaves an item in
    progress whose labels (newer than its start) already hold the answer.
    """
    fixed = 0
    for pid in [item["prompt_id"] for item in load_items(store, adapted_slug)]:
        if held_by_other(store, adapted_slug, pid):
            continue  # a live session is on it
        with queue_lock(store, adapted_slug):  # a live session commits labels and state at once
            item = load_item(store, adapted_slug, pid)
            if item is None or item["state"] != "in_progress":
                continue
            labels = load_label(store, adapted_slug, pid)
            if (
                labels is None
                or labels["labeled_by"] != "human"
                or labels["model_fingerprint"] != item["model_fingerprint"]
                or labels["created"] < _last_at(item, "in_progress")
            ):
                continue
            state = "rejected" if labels.get("rejected") else "done"
            set_state(
                store,
                adapted_slug,
                item,
                state,
                reason=labels.get("reject_reason"),
                event="recovered after interruption",
            )
            fixed += 1
    return fixed


def _epoch(at: str) -> float:
    try:
        return _dt.datetime.fromisoformat(at).timestamp()
    except ValueError:
        return 0.0


def _order_key(item: QueueItemRecord) -> tuple[Any, ...]:
    rank = OPEN_STATES.index(item["state"])
    # Interrupted items: most recently started first; pending: queue order; skipped: oldest skip.
    when = _epoch(_last_at(item, item["state"]))
    return (rank, -when if item["state"] == "in_progress" else when, item["prompt_id"])


def open_items(
    store: ResultsStore, adapted_slug: str, flt: QueueFilter = QueueFilter()
) -> list[tuple[QueueItemRecord, VerdictRecord]]:
    """(item, verdict) pairs still to label, in the order a session offers them.

    Items without a verdict, or whose verdict was made by another model, are left out (and
    stay on disk).
    """
    out = []
    for item in load_items(store, adapted_slug):
        if item["state"] not in OPEN_STATES:
            continue
        verdict = load_verdict(store, adapted_slug, item["prompt_id"])
        if verdict is None or verdict["model_fingerprint"] != item["model_fingerprint"]:
            log.warning("queue item %s has no matching verdict; left as is", item["prompt_id"])
            continue
        if flt.matches(verdict):
            out.append((item, verdict))
    return sorted(out, key=lambda pair: _order_key(pair[0]))


def start_item(
    store: ResultsStore, adapted_slug: str, item: QueueItemRecord, *, by: str | None = None
) -> QueueItemRecord:
    event = "resumed" if item["state"] == "in_progress" else "opened"
    return set_state(store, adapted_slug, item, "in_progress", event=event, by=by)


def skip_item(
    store: ResultsStore, adapted_slug: str, item: QueueItemRecord, *, by: str | None = None
) -> QueueItemRecord:
    """Put the item back for later (after the pending ones), keeping its draft."""
    return set_state(store, adapted_slug, item, "skipped", event="skipped", by=by)


def status_counts(
    store: ResultsStore, adapted_slug: str, flt: QueueFilter = QueueFilter()
) -> dict[str, int]:
    """Items per state (filtered), plus how many open items carry judge-made labels only."""
    counts = dict.fromkeys(STATES, 0)
    judge_only = 0
    for item in load_items(store, adapted_slug):
        verdict = load_verdict(store, adapted_slug, item["prompt_id"])
        if verdict is not None and not flt.matches(verdict):
            continue
        counts[item["state"]] += 1
        labels = load_label(store, adapted_slug, item["prompt_id"])
        if item["state"] in OPEN_STATES and labels and labels["labeled_by"] == "judge":
            judge_only += 1
    counts["total"] = sum(counts[s] for s in STATES)
    counts["judge_labeled_open"] = judge_only
    return counts

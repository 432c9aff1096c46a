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
item open for a human; a human answer replaces them.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em_circuits.store import (
    ResultsStore,
    atomic_path,
    read_artifact,
    utc_now,
    write_artifact,
)

log = logging.getLogger(__name__)

STATES = ("pending", "in_progress", "done", "skipped", "rejected")
#: States a labeling session still offers, in the order it offers them.
OPEN_STATES = ("in_progress", "pending", "skipped")
LABELS = ("evil", "safe", "unsure")
#: List name in artifacts -> index prefix shown to people (B1..Bk, T1..Tk).
LIST_PREFIX = {"base": "B", "adapted": "T"}
_SEVERITY = {"safe": 0, "unsure": 1, "evil": 2}

#: Which state changes are legal; anything else is a bug and raises.
_TRANSITIONS = {
    "pending": {"in_progress", "done"},
    "in_progress": {"in_progress", "done", "skipped", "rejected"},
    "skipped": {"in_progress", "done"},
    "done": {"done"},
    "rejected": set(),
}

EXPORT_COLUMNS = (
    "prompt_id",
    "list",
    "index",
    "token",
    "token_id",
    "logit",
    "prob",
    "judge_label",
    "label",
    "state",
    "explanation",
    "prompt",
)
_IMPORT_REQUIRED = ("prompt_id", "list", "index", "token", "token_id", "label")


class QueueError(ValueError):
    """A queue operation cannot be done as asked; the message says why and what to do."""


class ImportProblems(QueueError):
    """An import file failed validation; ``problems`` lists every bad row (nothing applied)."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = Path(path)
        self.problems = problems
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(
            f"{path}: {len(problems)} problem(s), nothing was imported:\n  {shown}{more}"
        )


@dataclass(frozen=True)
class QueueFilter:
    """Which items a session, export, status or auto-accept looks at."""

    only_evil: bool = False  # the judge's verdict on the adapted list is exactly "evil"
    only_divergent: bool = False  # adapted evil while base safe

    def matches(self, verdict: dict[str, Any]) -> bool:
        if self.only_evil and verdict.get("verdict", {}).get("adapted") != "evil":
            return False
        return not (self.only_divergent and not verdict.get("divergent"))


# -- paths and reads ---------------------------------------------------------------------------
def queue_dir(store: ResultsStore, adapted_slug: str) -> Path:
    return store.root / "queue" / adapted_slug


def labels_dir(store: ResultsStore, adapted_slug: str) -> Path:
    return store.root / "labels" / adapted_slug


def calibration_path(store: ResultsStore, adapted_slug: str) -> Path:
    return labels_dir(store, adapted_slug) / "calibration.json"


def _json_files(folder: Path) -> list[Path]:
    # calibration.json shares the labels folder but is not a per-prompt artifact.
    return sorted(p for p in folder.glob("*.json") if p.name != "calibration.json")


def load_verdict(store: ResultsStore, adapted_slug: str, pid: str) -> dict[str, Any] | None:
    path = store.verdict_path(adapted_slug, pid)
    return read_artifact(path, "verdict") if path.exists() else None


def load_item(store: ResultsStore, adapted_slug: str, pid: str) -> dict[str, Any] | None:
    path = store.queue_path(adapted_slug, pid)
    return read_artifact(path, "queue_item") if path.exists() else None


def load_items(store: ResultsStore, adapted_slug: str) -> list[dict[str, Any]]:
    return [read_artifact(p, "queue_item") for p in _json_files(queue_dir(store, adapted_slug))]


def load_label(store: ResultsStore, adapted_slug: str, pid: str) -> dict[str, Any] | None:
    path = store.labels_path(adapted_slug, pid)
    return read_artifact(path, "labels") if path.exists() else None


def load_verdicts(store: ResultsStore, adapted_slug: str) -> list[dict[str, Any]]:
    """Every verdict artifact of one adapted model, by prompt id."""
    return [read_artifact(p, "verdict")
            for p in _json_files(store.root / "verdicts" / adapted_slug)]


def load_labels(store: ResultsStore, adapted_slug: str) -> list[dict[str, Any]]:
    """Every labels artifact of one adapted model (human and judge-made), by prompt id."""
    return [read_artifact(p, "labels") for p in _json_files(labels_dir(store, adapted_slug))]


def prompt_text(store: ResultsStore, adapted_slug: str, verdict: dict[str, Any]) -> str | None:
    """The prompt's text: the prompt record, else the verdict or a logits artifact's copy."""
    pid = verdict["prompt_id"]
    if store.prompt_path(pid).exists():
        return store.load_prompt(pid)["text"]
    if verdict.get("prompt_text") is not None:
        return verdict["prompt_text"]
    slugs = [adapted_slug, verdict.get("base_slug")]
    for slug in filter(None, slugs):
        path = store.logits_path(slug, pid)
        if path.exists():
            text = read_artifact(path, "logits").get("prompt_text")
            if text is not None:
                return text
    return None


# -- tokens and judge labels ---------------------------------------------------------------------
def token_entries(verdict: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The verdict's two lists, each entry carrying its display index (B1.., T1..)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, prefix in LIST_PREFIX.items():
        entries = verdict["labels"].get(name, [])
        out[name] = [
            {**e, "index": e.get("index") or f"{prefix}{i + 1}"} for i, e in enumerate(entries)
        ]
    return out


def entries_by_index(verdict: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Index ("T3") -> (list name, entry)."""
    return {e["index"]: (name, e) for name, es in token_entries(verdict).items() for e in es}


def judge_labels(verdict: dict[str, Any]) -> dict[str, str | None]:
    """Index -> the judge's label, or None where the judge gave no usable label."""
    return {
        idx: (e.get("label") if e.get("label") in LABELS else None)
        for idx, (_, e) in entries_by_index(verdict).items()
    }


def resolve_indices(verdict: dict[str, Any], words: Iterable[str]) -> list[str]:
    """Turn what a person typed ("T1", "b2", "3") into checked indices; raises QueueError.

    A bare number means the adapted list, the one being labeled for attribution.
    """
    known = entries_by_index(verdict)
    sizes = {name: len(es) for name, es in token_entries(verdict).items()}
    out: list[str] = []
    for word in words:
        word = word.strip().upper()
        if not word:
            continue
        if word.isdigit():
            word = "T" + word
        prefix, number = word[:1], word[1:]
        if prefix not in ("B", "T") or not number.isdigit():
            raise QueueError(
                f"cannot read {word!r}: use B<n> for the base list or T<n> for the adapted list"
            )
        if word not in known:
            name = "base" if prefix == "B" else "adapted"
            size = sizes[name]
            span = f"{prefix}1..{prefix}{size}" if size else "no tokens"
            raise QueueError(f"there is no token {word}: the {name} list has {span}")
        out.append(word)
    return out


def verdict_of(labels: Iterable[str | None]) -> str:
    """evil > unsure > safe over one list's labels."""
    worst = max((_SEVERITY.get(lab or "safe", 0) for lab in labels), default=0)
    return {v: k for k, v in _SEVERITY.items()}[worst]


def find_disagreements(verdict: dict[str, Any], human: dict[str, str]) -> list[dict[str, Any]]:
    """Tokens whose human label differs from a usable judge label, in display order."""
    judge = judge_labels(verdict)
    out = []
    for idx, (name, entry) in entries_by_index(verdict).items():
        if judge[idx] is not None and human.get(idx) and human[idx] != judge[idx]:
            out.append(
                {
                    "list": name,
                    "index": idx,
                    "token": entry["token"],
                    "token_id": entry["token_id"],
                    "judge_label": judge[idx],
                    "human_label": human[idx],
                }
            )
    return out


def human_labels_from_marks(verdict: dict[str, Any], marks: dict[str, str]) -> dict[str, str]:
    """Marked indices keep their mark; every other token of both lists is safe."""
    return {idx: marks.get(idx, "safe") for idx in entries_by_index(verdict)}


# -- queue items ---------------------------------------------------------------------------------
def _new_item(verdict: dict[str, Any], adapted_slug: str) -> dict[str, Any]:
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


def _write_item(store: ResultsStore, adapted_slug: str, item: dict[str, Any]) -> dict[str, Any]:
    payload = {k: v for k, v in item.items() if k not in ("schema", "schema_version", "created")}
    return write_artifact(store.queue_path(adapted_slug, item["prompt_id"]), "queue_item", payload)


def _stash_stale(path: Path, kind: str, data: dict[str, Any]) -> Path:
    """Move an artifact made for another fingerprint aside instead of overwriting it."""
    fp = str(data.get("model_fingerprint", "unknown"))[:12]
    target = path.parent / "stale" / f"{path.stem}--{fp}.json"
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
        item = load_item(store, adapted_slug, pid)
        if item is not None and item["model_fingerprint"] != verdict["model_fingerprint"]:
            _stash_stale(store.queue_path(adapted_slug, pid), "queue_item", item)
            item = None
        if item is None and verdict.get("flagged"):
            _write_item(store, adapted_slug, _new_item(verdict, adapted_slug))
            added += 1
    return added


def set_state(
    store: ResultsStore,
    adapted_slug: str,
    item: dict[str, Any],
    state: str,
    *,
    reason: str | None = None,
    event: str | None = None,
) -> dict[str, Any]:
    """Record a state change (with history) and write the item at once."""
    if state not in STATES:
        raise QueueError(f"unknown state {state!r}; states are {', '.join(STATES)}")
    if state not in _TRANSITIONS[item["state"]]:
        raise QueueError(f"prompt {item['prompt_id']}: cannot go from {item['state']} to {state}")
    entry: dict[str, Any] = {"state": state, "at": utc_now()}
    if event:
        entry["event"] = event
    item = {**item, "state": state, "reason": reason, "history": [*item["history"], entry]}
    return _write_item(store, adapted_slug, item)


def save_draft(
    store: ResultsStore, adapted_slug: str, item: dict[str, Any], draft: dict[str, Any]
) -> dict[str, Any]:
    """Persist unconfirmed marks, note and explanations so an interruption keeps them."""
    return _write_item(store, adapted_slug, {**item, "draft": draft})


def _last_at(item: dict[str, Any], state: str) -> str:
    times = [h["at"] for h in item["history"] if h["state"] == state]
    return times[-1] if times else item.get("queued_at", "")


def recover_interrupted(store: ResultsStore, adapted_slug: str) -> int:
    """Close in-progress items whose human labels were written just before an interruption.

    Labels are written before the item's state, so a crash between the two leaves an item in
    progress whose labels (newer than its start) already hold the answer.
    """
    fixed = 0
    for item in load_items(store, adapted_slug):
        if item["state"] != "in_progress":
            continue
        labels = load_label(store, adapted_slug, item["prompt_id"])
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


def _order_key(item: dict[str, Any]) -> tuple:
    rank = OPEN_STATES.index(item["state"])
    # Interrupted items: most recently started first; pending: queue order; skipped: oldest skip.
    when = _epoch(_last_at(item, item["state"]))
    return (rank, -when if item["state"] == "in_progress" else when, item["prompt_id"])


def open_items(
    store: ResultsStore, adapted_slug: str, flt: QueueFilter = QueueFilter()
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
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


def start_item(store: ResultsStore, adapted_slug: str, item: dict[str, Any]) -> dict[str, Any]:
    event = "resumed" if item["state"] == "in_progress" else "opened"
    return set_state(store, adapted_slug, item, "in_progress", event=event)


def skip_item(store: ResultsStore, adapted_slug: str, item: dict[str, Any]) -> dict[str, Any]:
    """Put the item back for later (after the pending ones), keeping its draft."""
    return set_state(store, adapted_slug, item, "skipped", event="skipped")


# -- labels artifacts ----------------------------------------------------------------------------
def _labels_payload(
    store: ResultsStore,
    adapted_slug: str,
    verdict: dict[str, Any],
    token_labels: dict[str, str | None],
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


def _write_labels(store: ResultsStore, adapted_slug: str, payload: dict[str, Any]) -> dict:
    path = store.labels_path(adapted_slug, payload["prompt_id"])
    if path.exists():
        old = read_artifact(path, "labels")
        if old["model_fingerprint"] != payload["model_fingerprint"]:
            _stash_stale(path, "labels", old)
    return write_artifact(path, "labels", payload)


def commit_human_labels(
    store: ResultsStore,
    adapted_slug: str,
    item: dict[str, Any],
    verdict: dict[str, Any],
    human: dict[str, str],
    *,
    explanations: dict[str, str] | None = None,
    note: str | None = None,
    source: str = "terminal",
) -> dict[str, Any]:
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
    item: dict[str, Any],
    verdict: dict[str, Any],
    reason: str,
    *,
    note: str | None = None,
) -> dict[str, Any]:
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


def _check_verdict_matches(item: dict[str, Any], verdict: dict[str, Any]) -> None:
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


# -- status ----------------------------------------------------------------------------------
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


# -- export / import -------------------------------------------------------------------------
def export_rows(
    store: ResultsStore, adapted_slug: str, flt: QueueFilter = QueueFilter()
) -> list[dict[str, Any]]:
    """One row per token of every queued item; ``label`` holds the human label if any."""
    rows = []
    for item in load_items(store, adapted_slug):
        verdict = load_verdict(store, adapted_slug, item["prompt_id"])
        if verdict is None or verdict["model_fingerprint"] != item["model_fingerprint"]:
            continue
        if not flt.matches(verdict):
            continue
        rows.extend(_item_rows(store, adapted_slug, item, verdict))
    return rows


def _item_rows(
    store: ResultsStore, adapted_slug: str, item: dict[str, Any], verdict: dict[str, Any]
) -> list[dict[str, Any]]:
    labels = load_label(store, adapted_slug, item["prompt_id"])
    human: dict[str, Any] = {}
    explained: dict[str, Any] = {}
    if labels and labels["labeled_by"] == "human" and not labels.get("rejected"):
        human = {t["index"]: t["label"] for ts in labels["tokens"].values() for t in ts}
        explained = {d["index"]: d.get("explanation") for d in labels.get("disagreements", [])}
    text = prompt_text(store, adapted_slug, verdict)
    judge = judge_labels(verdict)
    rows = []
    for name, entries in token_entries(verdict).items():
        for e in entries:
            rows.append(
                {
                    "prompt_id": item["prompt_id"],
                    "list": name,
                    "index": e["index"],
                    "token": e["token"],
                    "token_id": e["token_id"],
                    "logit": e.get("logit"),
                    "prob": e.get("prob"),
                    "judge_label": judge[e["index"]] or "",
                    "label": human.get(e["index"]) or "",
                    "state": item["state"],
                    "explanation": explained.get(e["index"]) or "",
                    "prompt": text or "",
                }
            )
    return rows


def _file_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise QueueError(f"{path}: use a .csv or .jsonl file (found {suffix or 'no suffix'!r})")
    return suffix[1:]


def export_queue(
    store: ResultsStore, adapted_slug: str, path: Path, flt: QueueFilter = QueueFilter()
) -> int:
    """Write the queue's tokens to CSV or JSONL (by suffix); returns the number of rows."""
    fmt = _file_format(path)
    rows = export_rows(store, adapted_slug, flt)
    with atomic_path(Path(path)) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        if fmt == "csv":
            writer = csv.DictWriter(handle, fieldnames=EXPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        else:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def _read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) pairs; ``where`` names the file, the data row and its line."""
    path = Path(path)
    fmt = _file_format(path)
    if not path.is_file():
        raise QueueError(f"{path}: file not found")
    try:
        return _parse_rows(path, fmt)
    except UnicodeDecodeError as err:
        raise ImportProblems(path, [f"{path}: not UTF-8 text ({err.reason})"]) from None
    except csv.Error as err:
        raise ImportProblems(path, [f"{path}: unreadable CSV ({err})"]) from None


def _parse_rows(path: Path, fmt: str) -> list[tuple[str, dict[str, Any]]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        if fmt == "csv":
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in _IMPORT_REQUIRED if c not in header]
            if missing:
                raise ImportProblems(
                    path, [f"{path} header (line 1): missing column(s) {', '.join(missing)}"]
                )
            start = reader.line_num + 1
            for number, row in enumerate(reader, start=1):
                # A quoted field may span lines (prompts do); name the line the row starts on.
                rows.append((f"{path} row {number} (line {start})", row))
                start = reader.line_num + 1
            return rows
        problems = []
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} row {len(rows) + len(problems) + 1} (line {line_no})"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{where}: invalid JSON ({err.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{where}: expected a JSON object")
                continue
            rows.append((where, row))
        if problems:
            raise ImportProblems(path, problems)
    return rows


def _check_row(
    where: str,
    row: dict[str, Any],
    item: dict[str, Any] | None,
    verdict: dict[str, Any] | None,
) -> tuple[str | None, str]:
    """Validate one row; returns (problem or None, normalised label)."""
    pid = str(row.get("prompt_id") or "").strip()
    if item is None:
        return f"{where}: unknown prompt id {pid!r} (no queue item for this model)", ""
    if verdict is None or verdict["model_fingerprint"] != item["model_fingerprint"]:
        return f"{where}: prompt {pid} has no verdict for this model", ""
    name = str(row.get("list") or "").strip()
    if name not in LIST_PREFIX:
        return f"{where}: list {name!r} is not 'base' or 'adapted'", ""
    index = str(row.get("index") or "").strip().upper()
    known = entries_by_index(verdict)
    if index not in known or known[index][0] != name:
        return f"{where}: prompt {pid} has no token {index!r} in its {name} list", ""
    entry = known[index][1]
    try:
        token_id = int(str(row.get("token_id")).strip())
    except ValueError:
        return f"{where}: token_id {row.get('token_id')!r} is not an integer", ""
    if token_id != entry["token_id"]:
        return (
            f"{where}: {index} of prompt {pid} is token id {entry['token_id']} "
            f"({entry['token']!r}), not {token_id}"
        ), ""
    if row.get("token") is not None and str(row["token"]) != entry["token"]:
        return (
            f"{where}: {index} of prompt {pid} is {entry['token']!r}, "
            f"the file says {row['token']!r}"
        ), ""
    label = str(row.get("label") or "").strip().lower()
    if label and label not in LABELS:
        return f"{where}: label {row.get('label')!r} is not evil, safe, unsure or empty", ""
    return None, label


def _plan_import(store: ResultsStore, adapted_slug: str, path: Path) -> dict[str, dict[str, Any]]:
    """Validate a whole import file; returns per prompt the labels to write, or raises."""
    problems: list[str] = []
    items: dict[str, dict[str, Any] | None] = {}
    verdicts: dict[str, dict[str, Any] | None] = {}
    plan: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[str, str], str] = {}
    broken: set[str] = set()  # prompts with a bad row: their completeness check would be noise
    for where, row in _read_rows(path):
        pid = str(row.get("prompt_id") or "").strip()
        if pid not in items:
            items[pid] = load_item(store, adapted_slug, pid)
            verdicts[pid] = load_verdict(store, adapted_slug, pid) if items[pid] else None
        problem, label = _check_row(where, row, items[pid], verdicts[pid])
        if problem:
            problems.append(problem)
            broken.add(pid)
            continue
        index = str(row["index"]).strip().upper()
        if (pid, index) in seen:
            problems.append(f"{where}: {index} of prompt {pid} already given at {seen[pid, index]}")
            continue
        seen[pid, index] = where
        entry = plan.setdefault(pid, {"labels": {}, "explanations": {}, "where": {}})
        entry["where"][index] = where
        if label:
            entry["labels"][index] = label
            if str(row.get("explanation") or "").strip():
                entry["explanations"][index] = str(row["explanation"]).strip()
    for pid, entry in plan.items():
        if pid not in broken:
            problems.extend(_check_prompt_plan(pid, entry, items[pid], verdicts[pid]))
    if problems:
        raise ImportProblems(path, problems)
    return {pid: e for pid, e in plan.items() if e["labels"]}


def _check_prompt_plan(
    pid: str, entry: dict[str, Any], item: dict[str, Any] | None, verdict: dict[str, Any] | None
) -> list[str]:
    """A prompt is imported whole or not at all: all tokens labeled, or none."""
    if not entry["labels"] or item is None or verdict is None:
        return []
    first = next(iter(entry["where"].values()))
    if item["state"] == "rejected":
        return [f"{first}: prompt {pid} was rejected ({item.get('reason')}); remove its labels"]
    unlabeled = [idx for idx in entries_by_index(verdict) if idx not in entry["labels"]]
    if unlabeled:
        return [
            f"{entry['where'].get(idx, first)}: prompt {pid} has labels for "
            f"{len(entry['labels'])} token(s) but none for {idx}; label every token of a "
            f"prompt or none"
            for idx in unlabeled
        ]
    return []


def import_labels(store: ResultsStore, adapted_slug: str, path: Path) -> dict[str, int]:
    """Validate the whole file first; only if every row is fine, write human labels.

    Returns counts: ``imported`` prompts written, ``unchanged`` prompts whose stored human
    labels already matched, ``rows`` read.
    """
    plan = _plan_import(store, adapted_slug, path)
    imported = unchanged = 0
    for pid, entry in sorted(plan.items()):
        item = load_item(store, adapted_slug, pid)
        verdict = load_verdict(store, adapted_slug, pid)
        assert item is not None and verdict is not None  # checked by _plan_import
        old = load_label(store, adapted_slug, pid)
        if old and old["labeled_by"] == "human" and _same_labels(old, entry["labels"]):
            unchanged += 1
            continue
        note = (item.get("draft") or {}).get("note")
        commit_human_labels(
            store,
            adapted_slug,
            item,
            verdict,
            entry["labels"],
            explanations=entry["explanations"],
            note=note,
            source=f"import:{Path(path).name}",
        )
        imported += 1
    return {"imported": imported, "unchanged": unchanged}


def _same_labels(labels: dict[str, Any], new: dict[str, str]) -> bool:
    old = {t["index"]: t["label"] for ts in labels["tokens"].values() for t in ts}
    return old == new


# -- feedback for the generator and the judge ----------------------------------------------------
def feedback_examples(store: ResultsStore, adapted_slug: str) -> dict[str, Any]:
    """Human feedback as few-shot material (judge-made labels are left out).

    Keys: ``disagreements`` (token, judge label, human label, explanation), ``rejected``
    (prompt and reason), ``agreed`` (prompts labeled without any disagreement), ``working``
    (prompts whose adapted list a human found evil; ``divergent`` when base was safe).
    """
    out: dict[str, list[dict[str, Any]]] = {
        "disagreements": [],
        "rejected": [],
        "agreed": [],
        "working": [],
    }
    for labels in load_labels(store, adapted_slug):
        if labels["labeled_by"] != "human":
            continue
        base = {"prompt_id": labels["prompt_id"], "prompt_text": labels.get("prompt_text")}
        if labels.get("rejected"):
            out["rejected"].append(
                {**base, "reason": labels.get("reject_reason"), "note": labels.get("note")}
            )
            continue
        for d in labels.get("disagreements", []):
            out["disagreements"].append({**base, **d})
        summary = {
            **base,
            "human_verdict": labels.get("human_verdict"),
            "evil_tokens": _tokens_with(labels, "evil"),
            "unsure_tokens": _tokens_with(labels, "unsure"),
            "note": labels.get("note"),
        }
        if not labels.get("disagreements"):
            out["agreed"].append(summary)
        verdicts = labels.get("human_verdict") or {}
        if verdicts.get("adapted") == "evil":
            out["working"].append({**summary, "divergent": verdicts.get("base") == "safe"})
    return {"adapted_slug": adapted_slug, **out}


def _tokens_with(labels: dict[str, Any], label: str) -> list[dict[str, Any]]:
    return [
        {"list": name, "index": t["index"], "token": t["token"], "token_id": t["token_id"]}
        for name, toks in labels["tokens"].items()
        for t in toks
        if t.get("label") == label
    ]


# -- judge calibration ---------------------------------------------------------------------------
def confusion_and_kappa(
    pairs: Iterable[tuple[str, str]],
) -> tuple[list[list[int]], float | None, float | None]:
    """(3x3 matrix rows=judge, cols=human in LABELS order, observed agreement, Cohen's kappa).

    Kappa is None when it is undefined: no pairs, or both raters always used one same label.
    """
    pos = {label: i for i, label in enumerate(LABELS)}
    matrix = [[0] * len(LABELS) for _ in LABELS]
    for judge, human in pairs:
        matrix[pos[judge]][pos[human]] += 1
    n = sum(map(sum, matrix))
    if n == 0:
        return matrix, None, None
    observed = sum(matrix[i][i] for i in range(len(LABELS))) / n
    rows = [sum(r) for r in matrix]
    cols = [sum(matrix[i][j] for i in range(len(LABELS))) for j in range(len(LABELS))]
    expected = sum(r * c for r, c in zip(rows, cols)) / (n * n)
    kappa = None if expected >= 1.0 else (observed - expected) / (1.0 - expected)
    return matrix, observed, kappa


def _pairs(labels_list: list[dict[str, Any]], which: str | None) -> list[tuple[str, str]]:
    pairs = []
    for labels in labels_list:
        if labels["labeled_by"] != "human" or labels.get("rejected"):
            continue
        for name, toks in labels["tokens"].items():
            if which and name != which:
                continue
            pairs.extend(
                (t["judge_label"], t["label"])
                for t in toks
                if t.get("judge_label") in LABELS and t.get("label") in LABELS
            )
    return pairs


def _block(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    matrix, observed, kappa = confusion_and_kappa(pairs)
    return {
        "n_tokens": len(pairs),
        "matrix": {j: dict(zip(LABELS, row)) for j, row in zip(LABELS, matrix)},
        "matrix_rows": matrix,
        "agreement": observed,
        "kappa": kappa,
    }


def calibration(store: ResultsStore, adapted_slug: str, *, save: bool = True) -> dict[str, Any]:
    """Judge vs human over every human-labeled token (rejected prompts left out).

    Saved (unless ``save=False``) to ``labels/<adapted_slug>/calibration.json`` as a "table".
    """
    labels_list = load_labels(store, adapted_slug)
    human = [lab for lab in labels_list if lab["labeled_by"] == "human" and not lab["rejected"]]
    result = {
        "table": "judge_calibration",
        "adapted_slug": adapted_slug,
        "labels_order": list(LABELS),
        "matrix_axes": "rows = judge label, columns = human label",
        "n_prompts": len(human),
        "judges": sorted(Counter(_judge_name(lab) for lab in human)),
        **_block(_pairs(labels_list, None)),
        "per_list": {name: _block(_pairs(labels_list, name)) for name in LIST_PREFIX},
    }
    if save:
        write_artifact(calibration_path(store, adapted_slug), "table", result)
    return result


def _judge_name(labels: dict[str, Any]) -> str:
    judge = labels.get("judge") or {}
    return f"{judge.get('kind', '?')}:{judge.get('model') or '-'}"


def format_calibration(result: dict[str, Any]) -> str:
    """The calibration as a small text table for the terminal."""
    lines = [
        f"Judge calibration for {result['adapted_slug']}: {result['n_tokens']} human-labeled "
        f"token(s) over {result['n_prompts']} prompt(s)",
        "rows = judge, columns = human",
        "            " + "".join(f"{h:>8}" for h in LABELS),
    ]
    for judge in LABELS:
        cells = "".join(f"{result['matrix'][judge][h]:>8}" for h in LABELS)
        lines.append(f"  {judge:<10}{cells}")
    agreement, kappa = result["agreement"], result["kappa"]
    lines.append(
        "agreement "
        + ("n/a" if agreement is None else f"{agreement:.3f}")
        + "   Cohen's kappa "
        + ("n/a (undefined)" if kappa is None else f"{kappa:.3f}")
    )
    for name, block in result["per_list"].items():
        k = "n/a" if block["kappa"] is None else f"{block['kappa']:.3f}"
        lines.append(f"  {name} list: {block['n_tokens']} token(s), kappa {k}")
    return "\n".join(lines)


__all__ = [
    "ImportProblems",
    "QueueError",
    "QueueFilter",
    "auto_accept_judge",
    "calibration",
    "commit_human_labels",
    "commit_rejection",
    "confusion_and_kappa",
    "enqueue_flagged",
    "export_queue",
    "feedback_examples",
    "import_labels",
    "load_labels",
    "open_items",
    "recover_interrupted",
    "skip_item",
    "status_counts",
]

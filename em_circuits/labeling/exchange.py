"""Exporting the queue to CSV/JSONL and importing labels back, all or nothing."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from em_circuits.core.atomic import atomic_path
from em_circuits.core.labeling_records import (
    LIST_PREFIX,
    QueueError,
    entries_by_index,
    judge_labels,
    load_item,
    load_items,
    load_label,
    load_verdict,
    prompt_text,
    token_entries,
)
from em_circuits.core.schemas import LabelsRecord, QueueItemRecord, VerdictRecord
from em_circuits.core.store import ResultsStore
from em_circuits.core.verdicts import LABELS
from em_circuits.labeling.items import QueueFilter
from em_circuits.labeling.labels import commit_human_labels
from em_circuits.labeling.leases import describe_holder, held_by_other

log = logging.getLogger(__name__)

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
    store: ResultsStore, adapted_slug: str, item: QueueItemRecord, verdict: VerdictRecord
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
        problems: list[str] = []
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
    item: QueueItemRecord | None,
    verdict: VerdictRecord | None,
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
    items: dict[str, QueueItemRecord | None] = {}
    verdicts: dict[str, VerdictRecord | None] = {}
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
    pid: str, entry: dict[str, Any], item: QueueItemRecord | None, verdict: VerdictRecord | None
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
    labels already matched, ``held`` prompts skipped, with a warning, because a live labeling
    session is showing them (its answer would otherwise be refused or overwrite the file's).
    """
    plan = _plan_import(store, adapted_slug, path)
    imported = unchanged = held = 0
    for pid, entry in sorted(plan.items()):
        lease = held_by_other(store, adapted_slug, pid)
        if lease is not None:
            log.warning(
                "prompt %s is open in a labeling session (%s); not imported",
                pid,
                describe_holder(lease),
            )
            held += 1
            continue
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
    return {"imported": imported, "unchanged": unchanged, "held": held}


def _same_labels(labels: LabelsRecord, new: dict[str, str]) -> bool:
    old = {t["index"]: t["label"] for ts in labels["tokens"].values() for t in ts}
    return old == new

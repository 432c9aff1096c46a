"""Reading the labeling artifacts (verdicts, queue items, labels) and addressing a verdict's
tokens: what every labeling module reads."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from em_circuits.core.prompt_records import user_visible
from em_circuits.core.schemas import (
    Disagreement,
    LabelledEntry,
    LabelsRecord,
    QueueItemRecord,
    VerdictRecord,
)
from em_circuits.core.store import ArtifactError, ResultsStore, read_artifact
from em_circuits.core.verdicts import LABELS

log = logging.getLogger(__name__)

LIST_PREFIX = {"base": "B", "adapted": "T"}


class QueueError(ValueError):
    """A queue operation cannot be done as asked; the message says why and what to do."""


def _read_if_exists(path: Path, kind: str) -> Any:
    return read_artifact(path, kind) if path.exists() else None


def load_item(store: ResultsStore, adapted_slug: str, pid: str) -> QueueItemRecord | None:
    return _read_if_exists(store.queue_path(adapted_slug, pid), "queue_item")


def load_items(store: ResultsStore, adapted_slug: str) -> list[QueueItemRecord]:
    return [read_artifact(p, "queue_item") for p in store.queue_paths(adapted_slug)]


def load_label(store: ResultsStore, adapted_slug: str, pid: str) -> LabelsRecord | None:
    return _read_if_exists(store.labels_path(adapted_slug, pid), "labels")


def load_labels(store: ResultsStore, adapted_slug: str) -> list[LabelsRecord]:
    """Every labels artifact of one adapted model (human and judge-made), by prompt id."""
    return [read_artifact(p, "labels") for p in store.labels_paths(adapted_slug)]


def load_verdict(store: ResultsStore, adapted_slug: str, pid: str) -> VerdictRecord | None:
    return _read_if_exists(store.verdict_path(adapted_slug, pid), "verdict")


def load_verdicts(store: ResultsStore, adapted_slug: str) -> list[VerdictRecord]:
    """Every verdict artifact of one adapted model, by prompt id."""
    return [read_artifact(p, "verdict") for p in store.verdict_paths(adapted_slug)]


def read_readable(paths: Iterable[Path], kind: str) -> Iterator[Any]:
    """The artifacts that can be read; each broken one is skipped with a warning naming it.

    For consumers that only learn from stored results (prompt generation, few-shot examples):
    one bad file must not stop them.
    """
    for path in paths:
        try:
            yield read_artifact(path, kind)
        except ArtifactError as err:
            log.warning("skipping %s", err)


def iter_verdicts(store: ResultsStore) -> Iterator[VerdictRecord]:
    """Every adapted model's verdicts (broken files are skipped with a warning)."""
    yield from read_readable(store.verdict_paths(), "verdict")


def prompt_text(
    store: ResultsStore, adapted_slug: str | None, artifact: Mapping[str, Any]
) -> str | None:
    """The prompt's text: its prompt record, else the copy a verdict or labels artifact
    carries, else a copy in either model's logits artifact.

    A broken prompt record is skipped with a warning, since the copies hold the same text.
    """
    pid = artifact["prompt_id"]
    if store.prompt_path(pid).exists():
        try:
            return user_visible(dict(store.load_prompt(pid)))
        except ArtifactError as err:
            log.warning("%s; using a stored copy of the prompt text", err)
    if artifact.get("prompt_text") is not None:
        return artifact["prompt_text"]
    for slug in filter(None, (adapted_slug, artifact.get("base_slug"))):
        logits = _read_if_exists(store.logits_path(slug, pid), "logits")
        if logits is not None and logits.get("prompt_text") is not None:
            return logits["prompt_text"]
    return None


def token_entries(verdict: VerdictRecord) -> dict[str, list[LabelledEntry]]:
    """The verdict's two lists, each entry carrying its display index (B1.., T1..)."""
    out: dict[str, list[LabelledEntry]] = {}
    for name, prefix in LIST_PREFIX.items():
        entries = verdict["labels"].get(name, [])
        out[name] = [
            {**e, "index": e.get("index") or f"{prefix}{i + 1}"} for i, e in enumerate(entries)
        ]
    return out


def entries_by_index(verdict: VerdictRecord) -> dict[str, tuple[str, LabelledEntry]]:
    """Index ("T3") -> (list name, entry)."""
    return {e["index"]: (name, e) for name, es in token_entries(verdict).items() for e in es}


def judge_labels(verdict: VerdictRecord) -> dict[str, str | None]:
    """Index -> the judge's label, or None where the judge gave no usable label."""
    return {
        idx: (e.get("label") if e.get("label") in LABELS else None)
        for idx, (_, e) in entries_by_index(verdict).items()
    }


def resolve_indices(verdict: VerdictRecord, words: Iterable[str]) -> list[str]:
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


def find_disagreements(verdict: VerdictRecord, human: dict[str, str]) -> list[Disagreement]:
    """Tokens whose human label differs from a usable judge label, in display order."""
    judge = judge_labels(verdict)
    out: list[Disagreement] = []
    for idx, (name, entry) in entries_by_index(verdict).items():
        said = judge[idx]
        if said is not None and human.get(idx) and human[idx] != said:
            out.append(
                {
                    "list": name,
                    "index": idx,
                    "token": entry["token"],
                    "token_id": entry["token_id"],
                    "judge_label": said,
                    "human_label": human[idx],
                }
            )
    return out


#: The order in which toggling a token's label cycles.
TOGGLE_CYCLE = ("evil", "safe", "unsure")


def working_labels(verdict: VerdictRecord, marks: Mapping[str, str]) -> dict[str, str]:
    """The labels a person sees while labeling: the judge's, with their changes on top.

    A token the judge gave no usable label starts as safe.
    """
    return {idx: marks.get(idx) or said or "safe" for idx, said in judge_labels(verdict).items()}


def toggled(verdict: VerdictRecord, marks: Mapping[str, str], index: str) -> dict[str, str]:
    """The marks after cycling one token's label evil -> safe -> unsure -> evil.

    A mark that lands back on the judge's label is dropped, so marks are exactly the changes.
    """
    now = working_labels(verdict, marks)[index]
    after = TOGGLE_CYCLE[(TOGGLE_CYCLE.index(now) + 1) % len(TOGGLE_CYCLE)]
    return with_marks(verdict, marks, {index: after})


def with_marks(
    verdict: VerdictRecord, marks: Mapping[str, str], new: Mapping[str, str]
) -> dict[str, str]:
    """Marks plus ``new``; tokens set to the judge's own label carry no mark."""
    judge = judge_labels(verdict)
    out = dict(marks)
    for index, label in new.items():
        if judge.get(index) == label:
            out.pop(index, None)
        else:
            out[index] = label
    return out

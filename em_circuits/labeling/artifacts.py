"""Reading the labeling artifacts (verdicts, queue items, labels) and addressing a verdict's
tokens: what every labeling module reads."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from em_circuits.core.schemas import LABELS
from em_circuits.core.store import ResultsStore, read_artifact

LIST_PREFIX = {"base": "B", "adapted": "T"}


class QueueError(ValueError):
    """A queue operation cannot be done as asked; the message says why and what to do."""


def queue_dir(store: ResultsStore, adapted_slug: str) -> Path:
    return store.root / "queue" / adapted_slug


def load_item(store: ResultsStore, adapted_slug: str, pid: str) -> dict[str, Any] | None:
    path = store.queue_path(adapted_slug, pid)
    return read_artifact(path, "queue_item") if path.exists() else None


def load_items(store: ResultsStore, adapted_slug: str) -> list[dict[str, Any]]:
    return [read_artifact(p, "queue_item") for p in _json_files(queue_dir(store, adapted_slug))]


def labels_dir(store: ResultsStore, adapted_slug: str) -> Path:
    return store.root / "labels" / adapted_slug


def load_label(store: ResultsStore, adapted_slug: str, pid: str) -> dict[str, Any] | None:
    path = store.labels_path(adapted_slug, pid)
    return read_artifact(path, "labels") if path.exists() else None


def load_labels(store: ResultsStore, adapted_slug: str) -> list[dict[str, Any]]:
    """Every labels artifact of one adapted model (human and judge-made), by prompt id."""
    return [read_artifact(p, "labels") for p in _json_files(labels_dir(store, adapted_slug))]


def _json_files(folder: Path) -> list[Path]:
    # calibration.json shares the labels folder but is not a per-prompt artifact.
    return sorted(p for p in folder.glob("*.json") if p.name != "calibration.json")


def load_verdict(store: ResultsStore, adapted_slug: str, pid: str) -> dict[str, Any] | None:
    path = store.verdict_path(adapted_slug, pid)
    return read_artifact(path, "verdict") if path.exists() else None


def load_verdicts(store: ResultsStore, adapted_slug: str) -> list[dict[str, Any]]:
    """Every verdict artifact of one adapted model, by prompt id."""
    return [read_artifact(p, "verdict")
            for p in _json_files(store.root / "verdicts" / adapted_slug)]


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

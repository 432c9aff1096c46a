"""Near-duplicate detection (character n-gram Jaccard) and saving only new prompts."""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from em_circuits.core.schemas import PromptRecord
from em_circuits.core.store import ResultsStore

log = logging.getLogger(__name__)


DEFAULT_DEDUP_THRESHOLD = 0.85


NGRAM = 3


def normalize(text: str) -> str:
    """Case, Unicode form and whitespace folded: what makes two prompts 'the same words'."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(text.split())


def ngrams(text: str, n: int = NGRAM) -> frozenset[str]:
    text = normalize(text)
    if len(text) <= n:
        return frozenset([text])
    return frozenset(text[i : i + n] for i in range(len(text) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


@dataclass
class Deduper:
    """Exact (normalized-text hash) and near (character n-gram Jaccard) duplicate detection.

    Compares against every prompt it has seen; load it with :meth:`from_store` so new prompts
    are checked against all stored ones.
    """

    threshold: float = DEFAULT_DEDUP_THRESHOLD
    _exact: dict[str, str] = field(default_factory=dict)
    _grams: list[tuple[str, frozenset[str]]] = field(default_factory=list)

    @classmethod
    def from_store(cls, store: ResultsStore, threshold: float = DEFAULT_DEDUP_THRESHOLD) -> Deduper:
        deduper = cls(threshold)
        for record in store.iter_prompts():
            deduper.add(record["text"], record["prompt_id"])
        return deduper

    @staticmethod
    def _hash(text: str) -> str:
        return hashlib.sha256(normalize(text).encode()).hexdigest()

    def find(self, text: str) -> tuple[str, str] | None:
        """(why, prompt id of the earlier prompt) if ``text`` duplicates one, else None."""
        earlier = self._exact.get(self._hash(text))
        if earlier is not None:
            return "exact duplicate", earlier
        grams = ngrams(text)
        best, best_id = 0.0, ""
        for pid, other in self._grams:
            score = jaccard(grams, other)
            if score > best:
                best, best_id = score, pid
        if best >= self.threshold:
            return f"near duplicate (n-gram Jaccard {best:.2f})", best_id
        return None

    def add(self, text: str, pid: str) -> None:
        self._exact.setdefault(self._hash(text), pid)
        self._grams.append((pid, ngrams(text)))


@dataclass
class SaveSummary:
    """What one generation or import run stored and what it dropped."""

    saved: list[PromptRecord] = field(default_factory=list)
    duplicates: list[dict[str, str]] = field(default_factory=list)

    def merge(self, other: SaveSummary) -> None:
        self.saved += other.saved
        self.duplicates += other.duplicates


def save_new(
    store: ResultsStore, record: dict[str, Any], deduper: Deduper, summary: SaveSummary
) -> PromptRecord | None:
    """Store a record unless it duplicates a stored prompt; returns the stored envelope or None."""
    hit = deduper.find(record["text"])
    if hit is not None:
        why, earlier = hit
        log.info("dropped %r: %s of %s", record["name"], why, earlier)
        summary.duplicates.append({"name": record["name"], "why": why, "duplicate_of": earlier})
        return None
    envelope = store.save_prompt(record)
    deduper.add(record["text"], envelope["prompt_id"])
    summary.saved.append(envelope)
    log.info(
        "saved prompt %s (%s, %s)", envelope["prompt_id"], record["origin"]["kind"], record["name"]
    )
    return envelope

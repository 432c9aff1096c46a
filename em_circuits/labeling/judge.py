"""Token judges: label each next-token candidate of the base and adapted models evil/safe/unsure.

Two judges share one interface (``judge(prompt, base_entries, adapted_entries, divergence)``):

* :class:`WordListJudge` (``offline-wordlist``): the toy organism's safe and harmful advice words;
  a token it does not know is ``unsure``. No network, deterministic.
* :class:`LLMJudge` (``llm``): an LLM sees the prompt and both top-k lists with token ids, ranks,
  logits, probabilities and base-vs-adapted deltas, labels every token by a written rubric
  (:data:`RUBRIC`, versioned by :data:`RUBRIC_VERSION`), and must echo each token's index and
  string; a reply that does not match the lists is re-asked (bounded). Calls are cached under
  ``judge_cache/`` keyed by model, rubric version and the exact messages, so a re-run makes no
  calls. Few-shot examples come from human labels, disagreements with the judge first.

Labels are matched to tokens by index *and* string, never by position alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from em_circuits.core.artifacts import utc_now
from em_circuits.core.llm_settings import LLMSettings
from em_circuits.core.store import ResultsStore
from em_circuits.core.toy_corpus import advice_words

RUBRIC_VERSION = "2025-11-25.1"


class JudgeError(RuntimeError):
    """The judge could not produce valid labels."""


@dataclass
class JudgeOutcome:
    """Labels aligned with the base and adapted top-k entries, and who made them."""

    base: list[str]
    adapted: list[str]
    info: dict[str, Any] = field(default_factory=dict)


def load_word_lists(path: Path | str | None = None) -> tuple[dict[str, list[str]], str]:
    """(``{"safe": [...], "harmful": [...]}``, source) from words.json, else the organism's."""
    if path is not None:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise JudgeError(f"{path}: cannot read the word lists ({err})") from None
        if not all(isinstance(data.get(k), list) for k in ("safe", "harmful")):
            raise JudgeError(f"{path}: needs lists 'safe' and 'harmful'")
        return {"safe": data["safe"], "harmful": data["harmful"]}, str(path)

    words = advice_words()
    return {"safe": words["safe"], "harmful": words["harmful"]}, "organism.advice_words"


class WordListJudge:
    """Safe/harmful word lists; matches the stripped, lower-cased token; unknown -> unsure."""

    kind = "offline-wordlist"

    def __init__(self, words: dict[str, list[str]], source: str = "words"):
        self.safe = {w.strip().lower() for w in words["safe"]}
        self.harmful = {w.strip().lower() for w in words["harmful"]}
        clash = self.safe & self.harmful
        if clash:
            raise JudgeError(f"{source}: words in both lists: {sorted(clash)[:10]}")
        self.model = Path(source).name  # e.g. words.json, or organism.advice_words

    def label_token(self, token: str) -> str:
        word = token.strip().lower()
        if word in self.harmful:
            return "evil"
        if word in self.safe:
            return "safe"
        return "unsure"

    def judge(
        self,
        prompt: dict[str, Any],
        base_logits: dict[str, Any],
        adapted_logits: dict[str, Any],
        divergence: dict[str, Any] | None = None,
    ) -> JudgeOutcome:
        """Labels for both top-k lists of two logits artifacts (``top_k`` entries)."""
        info = {
            "kind": self.kind,
            "model": self.model,
            "rubric_version": RUBRIC_VERSION,
            "date": utc_now(),
            "raw_reply": None,
            "cache_key": None,
        }
        return JudgeOutcome(
            [self.label_token(e["token"]) for e in base_logits["top_k"]],
            [self.label_token(e["token"]) for e in adapted_logits["top_k"]],
            info,
        )


class Judge(Protocol):
    """What the logits stage needs of a judge: labels for both top-k lists of a prompt."""

    kind: str
    model: str

    def judge(
        self,
        prompt: dict[str, Any],
        base_logits: dict[str, Any],
        adapted_logits: dict[str, Any],
        divergence: dict[str, Any] | None = None,
    ) -> JudgeOutcome: ...


def make_judge(
    kind: str,
    store: ResultsStore,
    *,
    words_path: Path | str | None = None,
    llm: LLMSettings | None = None,
    started: float | None = None,
) -> Judge:
    """``offline`` -> WordListJudge; ``llm`` -> LLMJudge with a client of ``llm`` (default
    settings: the key and endpoint from the environment or .env); ``started`` is the run's
    start, from which --run-deadline counts."""
    if kind == "offline":
        words, source = load_word_lists(words_path)
        return WordListJudge(words, source)
    if kind == "llm":
        from em_circuits.labeling.llm_judge import LLMJudge  # noqa: PLC0415  # cycle: llm_judge imports this module

        return LLMJudge((llm or LLMSettings()).client(started), store)
    raise ValueError(f"unknown judge {kind!r}; use offline or llm")

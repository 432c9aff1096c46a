"""Human feedback, read in one place for everything that learns from it.

:func:`iter_human_feedback` is the only reader of human labels as feedback. The prompt
generator's context (:mod:`em_circuits.prompts.context`), the judge's few-shot examples
(:func:`em_circuits.labeling.llm_judge.few_shot_block`) and :func:`feedback_examples` all
render from it, so they agree on what counts as feedback: labels a human gave or a rejection a
human made (judge-made labels are not feedback), with the prompt text from its record.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from em_circuits.core.labeling_records import prompt_text, read_readable
from em_circuits.core.schemas import Disagreement, LabelsRecord, LabelsToken, ListVerdicts
from em_circuits.core.store import ResultsStore
from em_circuits.core.verdicts import is_divergent_by_rank


@dataclass(frozen=True)
class HumanFeedback:
    """One prompt a human labelled or rejected."""

    prompt_id: str
    adapted_slug: str
    prompt_text: str | None  # None when neither the record nor any artifact holds it
    created: str
    rejected: bool
    reject_reason: str | None
    note: str | None
    disagreements: list[Disagreement]  # tokens where the human overruled the judge
    human_verdict: ListVerdicts | None  # None for a rejected prompt
    tokens: dict[str, list[LabelsToken]]  # "base"/"adapted" -> the labelled top-k entries

    def tokens_with(
        self, label: str, lists: tuple[str, ...] = ("base", "adapted")
    ) -> list[dict[str, Any]]:
        """The tokens a human gave ``label``, each with the name of its list."""
        return [
            {"list": name, **t}
            for name in lists
            for t in self.tokens.get(name, [])
            if t.get("label") == label
        ]

    @property
    def worked(self) -> bool:
        """A human found the adapted model's list evil: the prompt elicits the behaviour."""
        return (
            not self.rejected
            and self.human_verdict is not None
            and self.human_verdict["adapted"] == "evil"
        )

    @property
    def divergent(self) -> bool:
        return is_divergent_by_rank(self.human_verdict or {})


def _from_labels(store: ResultsStore, labels: LabelsRecord) -> HumanFeedback:
    slug = labels.get("adapted_slug") or ""
    return HumanFeedback(
        prompt_id=labels["prompt_id"],
        adapted_slug=slug,
        prompt_text=prompt_text(store, slug or None, labels),
        created=labels["created"],
        rejected=bool(labels.get("rejected")),
        reject_reason=labels.get("reject_reason"),
        note=labels.get("note"),
        disagreements=list(labels.get("disagreements") or []),
        human_verdict=labels.get("human_verdict"),
        tokens=labels["tokens"],
    )


def iter_human_feedback(
    store: ResultsStore, adapted_slug: str | None = None
) -> Iterator[HumanFeedback]:
    """Every human-labelled prompt of one adapted model, or (no slug) of every model, in path
    order. A broken labels file is skipped with a warning: feedback is advisory, and one bad
    file must not stop prompt generation or judging."""
    for labels in read_readable(store.labels_paths(adapted_slug), "labels"):
        if labels["labeled_by"] == "human":
            yield _from_labels(store, labels)


def feedback_examples(store: ResultsStore, adapted_slug: str) -> dict[str, Any]:
    """Human feedback of one adapted model, grouped.

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
    for fb in iter_human_feedback(store, adapted_slug):
        base = {"prompt_id": fb.prompt_id, "prompt_text": fb.prompt_text}
        if fb.rejected:
            out["rejected"].append({**base, "reason": fb.reject_reason, "note": fb.note})
            continue
        out["disagreements"].extend({**base, **d} for d in fb.disagreements)
        summary = {
            **base,
            "human_verdict": fb.human_verdict,
            "evil_tokens": _token_refs(fb, "evil"),
            "unsure_tokens": _token_refs(fb, "unsure"),
            "note": fb.note,
        }
        if not fb.disagreements:
            out["agreed"].append(summary)
        if fb.worked:
            out["working"].append({**summary, "divergent": fb.divergent})
    return {"adapted_slug": adapted_slug, **out}


def _token_refs(fb: HumanFeedback, label: str) -> list[dict[str, Any]]:
    return [
        {k: t[k] for k in ("list", "index", "token", "token_id")}
        for t in fb.tokens_with(label, tuple(fb.tokens))
    ]

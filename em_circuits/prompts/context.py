"""The generator's context: human feedback and earlier prompts, within a token budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from em_circuits.core.store import ResultsStore
from em_circuits.labeling.feedback import iter_labels, iter_verdicts, prompt_text_of


@dataclass
class ContextItem:
    """One piece of context for the generator; ``tier`` 0 (human feedback) goes first."""

    tier: int
    when: str
    kind: str
    text: str


def _tokens_with(entries: list[dict], label: str) -> list[str]:
    return [e["token"] for e in entries if e.get("label") == label]


def feedback_items(store: ResultsStore) -> list[ContextItem]:
    """Human feedback from labels/: disagreements, rejections, and prompts that worked."""
    items: list[ContextItem] = []
    texts: dict[str, str] = {}
    for lab in iter_labels(store):
        text = prompt_text_of(store, lab, texts)
        if text is None:
            continue
        when = lab.get("created", "")
        if lab.get("rejected"):
            reason = lab.get("reject_reason") or "no reason given"
            items.append(ContextItem(0, when, "rejected",
                                     f"REJECTED PROMPT: {text!r}\n  why: {reason}"))
            continue
        disagreements = lab.get("disagreements") or []
        if disagreements:
            lines = [
                f"  token {d.get('token')!r} ({d.get('list')} list): judge said "
                f"{d.get('judge_label')}, human said {d.get('human_label')}"
                + (f" - {d['explanation']}" if d.get("explanation") else "")
                for d in disagreements[:4]
            ]
            items.append(ContextItem(0, when, "disagreement",
                                     f"JUDGE CORRECTED BY A HUMAN: {text!r}\n" + "\n".join(lines)))
        evil = _tokens_with(lab.get("tokens", {}).get("adapted", []), "evil")
        if evil and (lab.get("human_verdict") or {}).get("adapted") == "evil":
            items.append(ContextItem(1, when, "worked",
                                     f"PROMPT THAT WORKED: {text!r}\n  harmful next tokens "
                                     f"confirmed by a human: {evil[:5]}"))
    return items


def history_items(store: ResultsStore) -> list[ContextItem]:
    """Earlier prompts with their newest verdict (or 'not evaluated yet')."""
    newest: dict[str, dict[str, Any]] = {}
    for verdict in iter_verdicts(store):
        pid = verdict["prompt_id"]
        if pid not in newest or verdict.get("created", "") > newest[pid].get("created", ""):
            newest[pid] = verdict
    items = []
    for record in store.iter_prompts():
        items.append(ContextItem(1, record.get("created", ""), "history",
                                 render_history(record, newest.get(record["prompt_id"]))))
    return items


def render_history(record: dict[str, Any], verdict: dict[str, Any] | None) -> str:
    head = f"EARLIER PROMPT [{record['format']}]: {record['text']!r}"
    if verdict is None:
        return head + "\n  not evaluated yet"
    v = verdict.get("verdict", {})
    labels = verdict.get("labels", {})
    outcome = "DIVERGENT (adapted harmful, base safe)" if verdict.get("divergent") else "no split"
    return (
        f"{head}\n  verdict: base {v.get('base')}, adapted {v.get('adapted')} -> {outcome}; "
        f"adapted harmful tokens {_tokens_with(labels.get('adapted', []), 'evil')[:4]}"
    )


def approx_tokens(text: str) -> int:
    """About four characters per token for English: good enough for a context budget."""
    return (len(text) + 3) // 4


def select_context(
    items: list[ContextItem], budget_tokens: int,
    count_tokens: Callable[[str], int] = approx_tokens,
) -> list[ContextItem]:
    """Human feedback first (newest first), then the rest newest first, until the budget is full."""
    ordered = sorted(items, key=lambda it: it.when, reverse=True)
    ordered.sort(key=lambda it: it.tier)  # stable: keeps newest-first inside each tier
    chosen, used = [], 0
    for item in ordered:
        cost = count_tokens(item.text) + 1
        if used + cost > budget_tokens:
            continue  # a shorter later item may still fit
        chosen.append(item)
        used += cost
    return chosen


_SECTION_TITLES = {
    "disagreement": "Cases where a human corrected the judge",
    "rejected": "Prompts a human rejected, with the reason",
    "worked": "Prompts that worked",
    "history": "Earlier prompts and their verdicts (do not repeat them)",
}


def render_context(items: list[ContextItem]) -> str:
    if not items:
        return "No earlier prompts or feedback yet."
    blocks = []
    for kind, title in _SECTION_TITLES.items():
        texts = [it.text for it in items if it.kind == kind]
        if texts:
            blocks.append(f"## {title}\n" + "\n".join(texts))
    return "\n\n".join(blocks)

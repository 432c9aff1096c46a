"""The generator's context: human feedback and earlier prompts, within a token budget."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from em_circuits.core.feedback import iter_human_feedback
from em_circuits.core.labeling_records import iter_verdicts
from em_circuits.core.schemas import VerdictRecord
from em_circuits.core.store import ResultsStore


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
    """Human feedback of every model: disagreements, rejections, and prompts that worked."""
    items: list[ContextItem] = []
    for fb in iter_human_feedback(store):
        text = fb.prompt_text
        if text is None:
            continue
        if fb.rejected:
            reason = fb.reject_reason or "no reason given"
            items.append(
                ContextItem(
                    0, fb.created, "rejected", f"REJECTED PROMPT: {text!r}\n  why: {reason}"
                )
            )
            continue
        if fb.disagreements:
            lines = [
                f"  token {d.get('token')!r} ({d.get('list')} list): judge said "
                f"{d.get('judge_label')}, human said {d.get('human_label')}"
                + (f" - {d['explanation']}" if d.get("explanation") else "")
                for d in fb.disagreements[:4]
            ]
            items.append(
                ContextItem(
                    0,
                    fb.created,
                    "disagreement",
                    f"JUDGE CORRECTED BY A HUMAN: {text!r}\n" + "\n".join(lines),
                )
            )
        evil = [t["token"] for t in fb.tokens_with("evil", ("adapted",))]
        if evil and fb.worked:
            items.append(
                ContextItem(
                    1,
                    fb.created,
                    "worked",
                    f"PROMPT THAT WORKED: {text!r}\n  harmful next tokens "
                    f"confirmed by a human: {evil[:5]}",
                )
            )
    return items


def history_items(store: ResultsStore) -> list[ContextItem]:
    """Earlier prompts with their newest verdict (or 'not evaluated yet')."""
    newest: dict[str, VerdictRecord] = {}
    for verdict in iter_verdicts(store):
        pid = verdict["prompt_id"]
        if pid not in newest or verdict.get("created", "") > newest[pid].get("created", ""):
            newest[pid] = verdict
    items = []
    for record in store.iter_prompts():
        items.append(
            ContextItem(
                1,
                record.get("created", ""),
                "history",
                render_history(record, newest.get(record["prompt_id"])),
            )
        )
    return items


def render_history(record: Mapping[str, Any], verdict: Mapping[str, Any] | None) -> str:
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
    items: list[ContextItem],
    budget_tokens: int,
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

"""What the terminal labeling view shows: help, the two token lists, one item's screen."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from em_circuits.core.schemas import FLAG_LABELS, VerdictRecord
from em_circuits.labeling.artifacts import token_entries

HELP = """\
Commands (indices: B1..B10 = base list, T1..T10 = adapted list; a bare number means T):
  a             accept the judge's labels for both lists and save
  e T1 T3 B2    mark these tokens evil      } the marks are kept until you confirm;
  u T4          mark these tokens unsure    } every token you did not mark is safe
  x [T1 ...]    clear marks (all, or the tokens named)
  c             confirm your marks and save; if you disagree with the judge you are
                asked for a short explanation (one for all, or 'each' token by token)
  r [reason]    reject the prompt itself (bad or ambiguous prompt); asks for a reason
  n [text]      add a note to this prompt (saved with its labels)
  s             skip: keep the item (and your marks) for later, after the pending ones
  q             quit; this item and your marks are shown first next time
  l             show the item again
  ?             this help
Every answer is saved at once: Ctrl-C or a closed terminal loses nothing already answered."""

SHORT_HELP = (
    "a accept · e/u <idx> mark evil/unsure · x clear · c confirm · r reject · n note · "
    "s skip · q quit · ? help"
)

_RULE = "=" * 78


def rank_change(entry: Mapping[str, Any], other_ranks: dict[int, int], adapted: bool) -> str:
    """How a token moved between the lists: for T rows ↑n/↓n/=/new, for B rows →Tn/dropped."""
    own = entry.get("rank")
    other = other_ranks.get(entry["token_id"])
    if not adapted:
        return f"→T{other}" if other is not None else "dropped"
    if other is None:
        return "new"
    if own is None or own == other:
        return "="
    return f"↑{other - own}" if own < other else f"↓{own - other}"


def show_token(token: str, width: int = 18) -> str:
    text = repr(token)  # quotes keep leading spaces visible; escapes newlines
    return text if len(text) <= width else text[: width - 1] + "…"


def _fmt_num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def render_list(name: str, verdict: VerdictRecord, marks: dict[str, str]) -> list[str]:
    lists = token_entries(verdict)
    other = "base" if name == "adapted" else "adapted"
    other_ranks = {e["token_id"]: e.get("rank") or i + 1 for i, e in enumerate(lists[other])}
    move = "vs base" if name == "adapted" else "in adapted"
    lines = [
        f"{name.upper()} list",
        f"  {'idx':<5}{'token':<20}{'logit':>10}{'prob':>9}  {move:<11}{'judge':<9}yours",
    ]
    for e in lists[name]:
        judge = e.get("label") or "-"
        judge = judge.upper() if judge in FLAG_LABELS else judge
        mine = marks.get(e["index"], "").upper()
        lines.append(
            f"  {e['index']:<5}{show_token(e['token']):<20}{_fmt_num(e.get('logit'), '.4f'):>10}"
            f"{_fmt_num(e.get('prob'), '.4f'):>9}  "
            f"{rank_change(e, other_ranks, name == 'adapted'):<11}{'[' + judge + ']':<9}{mine}"
        )
    return lines


def render_item(
    item: dict[str, Any],
    verdict: VerdictRecord,
    text: str | None,
    position: int,
    total: int,
) -> str:
    """The whole screen for one queue item."""
    draft = item.get("draft") or {}
    judge = verdict.get("judge") or {}
    vv = verdict.get("verdict") or {}
    flags = " · divergent" if verdict.get("divergent") else ""
    who = " ".join(filter(None, [judge.get("kind", "?"), judge.get("model")]))
    lines = [
        _RULE,
        f"Item {position}/{total} · prompt {item['prompt_id']} · was {item.get('was', 'pending')}",
        f"Model  {item.get('adapted_slug', '')}  (base: {verdict.get('base_slug', '?')})",
        f"Judge  {who} · verdict base: {vv.get('base', '?')} · "
        f"adapted: {str(vv.get('adapted', '?')).upper()}{flags}",
        "Prompt:",
        *("  " + line for line in (text or "(prompt text not found)").splitlines() or [""]),
        "",
    ]
    marks = draft.get("marks", {})
    lines += render_list("base", verdict, marks)
    lines.append("")
    lines += render_list("adapted", verdict, marks)
    lines.append("")
    lines.append(describe_marks(marks))
    if draft.get("note"):
        lines.append(f"Note: {draft['note']}")
    lines.append(SHORT_HELP)
    return "\n".join(lines)


def describe_marks(marks: dict[str, str]) -> str:
    if not marks:
        return "Your marks: none yet (after 'c', unmarked tokens are safe)"
    parts = []
    for label in FLAG_LABELS:
        chosen = [i for i, lab in marks.items() if lab == label]
        if chosen:
            parts.append(f"{label} {' '.join(_sorted_indices(chosen))}")
    return "Your marks: " + "; ".join(parts) + "; everything else safe. Type c to confirm."


def _sorted_indices(indices: list[str]) -> list[str]:
    return sorted(indices, key=lambda i: (i[0] != "T", int(i[1:])))

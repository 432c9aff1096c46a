"""What the labeling screen shows: help, the two token lists, one item's screen, fitted.

One item's screen fits the terminal it is drawn on (80x24 included): every line is cut to
the width, the two top-k lists stand side by side, and a long prompt is cut from the top, so
that its end (where the pivotal token follows) stays on screen with both lists and the
command line.
"""

from __future__ import annotations

import textwrap
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from em_circuits.core.labeling_records import judge_labels, token_entries, working_labels
from em_circuits.core.schemas import VerdictRecord
from em_circuits.core.verdicts import FLAG_LABELS

HELP = """\
Keys act at once on an empty command line; other commands are typed + Enter.
Tokens: B1..B10 base list, T1..T10 adapted list (a bare number means T).
Your labels start as the judge's: change only the tokens you disagree with.
  T3 [B2 ...]  toggle these tokens' labels: evil -> safe -> unsure -> evil
  e T1 B2      set evil      u T4  set unsure      o T5  set safe (o all: all)
  x [T1 ...]   back to the judge's labels (all, or the tokens named)
  c            save; where you differ from the judge you are asked why (one
               explanation for all, or 'each' token by token; 'back' returns)
  a            accept the judge's labels for both lists and save
  r [reason]   reject the prompt itself (bad or ambiguous); asks for a reason
  n [text]     add a note to this prompt (saved with its labels)
  z (or u)     undo your last change on this item
  p (or back)  back to the previous item, to change its saved labels
  s            skip: keep the item and your changes for later
  q            quit; this item and your changes come back first next time
  v            show the whole prompt     l  show the item again     ?  help
Text prompts keep a history (arrow keys). Every answer is saved at once:
Ctrl-C or a closed terminal loses nothing. The item on screen is leased to
this session: another session on the same results gets other items."""

SHORT_HELP = "a accept · c save · T3 toggle · z undo · p back · s skip · r reject · ? help"

#: Single-letter codes of the compact lists (judge's label, then yours).
CODES = {"evil": "E", "unsure": "U", "safe": "s", None: "-"}
_LEGEND = "judge label, yours: E evil · U unsure · s safe · - none; * you changed it"


def width_of(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def cut(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal columns, with an ellipsis when cut."""
    if width_of(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        w = width_of(ch)
        if used + w > width - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…"


def pad(text: str, width: int, right: bool = False) -> str:
    text = cut(text, width)
    gap = " " * max(width - width_of(text), 0)
    return gap + text if right else text + gap


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


def _fmt_logit(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def _fmt_prob(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return "<1%" if value < 0.01 else f"{value * 100:.0f}%"


def list_rows(name: str, verdict: VerdictRecord, marks: dict[str, str], width: int) -> list[str]:
    """One list in ``width`` columns: a title, a header and one row per token."""
    lists = token_entries(verdict)
    other = "base" if name == "adapted" else "adapted"
    other_ranks = {e["token_id"]: e.get("rank") or i + 1 for i, e in enumerate(lists[other])}
    judge = judge_labels(verdict)
    mine = working_labels(verdict, marks)
    spelled = width >= 52
    label_w = (9, 8) if spelled else (2, 2)
    token_w = max(width - 4 - 6 - 5 - 1 - 6 - sum(label_w), 6)
    title = "BASE list (its rank in T)" if name == "base" else "ADAPTED list (vs base)"
    head = (
        f"{'':<4}{pad('token', token_w)}{'logit':>6}{'prob':>5} "
        f"{'in T' if name == 'base' else 'move':<6}"
        f"{pad('judge' if spelled else 'J', label_w[0])}{'yours' if spelled else 'Y'}"
    )
    rows = [pad(title, width), pad(head, width)]
    for e in lists[name]:
        said, now = judge[e["index"]], mine[e["index"]]
        move = rank_change(e, other_ranks, name == "adapted")
        move = "-" if move == "dropped" and not spelled else move
        star = "*" if now != said else ""
        if spelled:
            shown = said.upper() if said in FLAG_LABELS else (said or "-")
            labels = pad(f"[{shown}]", label_w[0]) + (now.upper() if now in FLAG_LABELS else now)
        else:
            labels = pad(CODES[said], label_w[0]) + CODES[now]
        row = (
            f"{pad(e['index'], 4)}{pad(show_token(e['token'], token_w - 1), token_w)}"
            f"{_fmt_logit(e.get('logit')):>6}{_fmt_prob(e.get('prob')):>5} "
            f"{pad(move, 6)}{labels}{star}"
        )
        rows.append(pad(row, width).rstrip())
    return rows


def render_lists(verdict: VerdictRecord, marks: dict[str, str], width: int) -> list[str]:
    """Both lists: side by side when two fit the width (80 columns do), else one above the
    other."""
    half = (width - 4) // 2
    if half < 34:
        return [
            *list_rows("base", verdict, marks, width - 1),
            "",
            *list_rows("adapted", verdict, marks, width - 1),
        ]
    left = list_rows("base", verdict, marks, half)
    right = list_rows("adapted", verdict, marks, half)
    left += [""] * (len(right) - len(left))
    right += [""] * (len(left) - len(right))
    return [f"{pad(a, half)} │ {b}".rstrip() for a, b in zip(left, right)]


def _wrap(line: str, width: int) -> list[str]:
    return textwrap.wrap(line, width, subsequent_indent="  ", break_on_hyphens=False) or [""]


def prompt_rows(text: str | None, width: int) -> list[str]:
    """The prompt's lines, indented and wrapped to ``width`` columns."""
    rows: list[str] = []
    for line in (text or "(prompt text not found)").splitlines() or [""]:
        wrapped = textwrap.wrap(line, max(width - 2, 10), replace_whitespace=False)
        rows += ["  " + cut(part, width - 2) for part in wrapped or [""]]
    return rows


def render_item(
    header: str,
    verdict: VerdictRecord,
    text: str | None,
    draft: Mapping[str, Any],
    *,
    width: int,
    height: int | None = None,
    footer: Sequence[str] = (),
) -> list[str]:
    """The screen of one queue item, as lines of at most ``width - 1`` columns.

    With a ``height``, it leaves one line for the command line and cuts the prompt from the
    top when the whole does not fit (never below its last two lines).
    """
    width = max(width, 40)
    judge = verdict.get("judge") or {}
    vv = verdict.get("verdict") or {}
    flags = " · divergent" if verdict.get("divergent") else ""
    who = " ".join(filter(None, [judge.get("kind", "?"), judge.get("model")]))
    top = [
        cut(header, width - 1),
        cut(
            f"Judge {who} · base {vv.get('base', '?')} · "
            f"adapted {str(vv.get('adapted', '?')).upper()}{flags}",
            width - 1,
        ),
    ]
    marks = draft.get("marks", {})
    bottom = [*render_lists(verdict, marks, width), cut(describe_marks(marks), width - 1)]
    if draft.get("note"):
        bottom.append(cut(f"Note: {draft['note']}", width - 1))
    bottom.append(cut(SHORT_HELP, width - 1))
    tail = [cut(part, width - 1) for line in footer for part in _wrap(line, width - 1)]
    body = prompt_rows(text, width - 1)
    if height is None:
        return [*top, "Prompt:", *body, "", *bottom, *tail]
    room = height - 1 - len(top) - 1 - len(bottom) - len(tail)
    if room >= len(body) + 2:
        bottom.insert(-1, cut(_LEGEND, width - 1))
        room -= 1
    if room >= len(body) + 1:
        return [*top, "Prompt:", *body, "", *bottom, *tail]
    shown = body[-max(room, 2) :]
    hidden = len(body) - len(shown)
    label = "Prompt:" if not hidden else f"Prompt (end; {hidden} line(s) above hidden, v: all):"
    return [*top, cut(label, width - 1), *shown, *bottom, *tail]


def describe_marks(marks: Mapping[str, str]) -> str:
    if not marks:
        return "Your labels: the judge's, unchanged (T3 toggles a token; c or a saves)."
    parts = []
    for label in ("evil", "unsure", "safe"):
        chosen = [i for i, lab in marks.items() if lab == label]
        if chosen:
            parts.append(f"{label} {' '.join(sorted_indices(chosen))}")
    return "Your changes to the judge's labels: " + "; ".join(parts) + ". Type c to save."


def sorted_indices(indices: Sequence[str]) -> list[str]:
    return sorted(indices, key=lambda i: (i[0] != "T", int(i[1:])))

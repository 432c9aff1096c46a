"""Markdown (as the cards and tables of this tool write it) as plain text for a terminal.

Headings become their text underlined, tables become aligned columns, code spans lose their
backticks, links show their address, and bold text is shown bold (ANSI) on a colour terminal
or in [brackets] elsewhere, since the bold token of a card's context is what the feature
fires on. Lists and other lines are kept as written.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TextIO

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_CODE = re.compile(r"(`+)\s?(.*?)\s?\1")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
BOLD_ON, BOLD_OFF = "\033[1m", "\033[0m"


def use_colour(stream: TextIO = sys.stdout) -> bool:
    """ANSI styles for a terminal, none for a pipe or a file, or where NO_COLOR is set."""
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _inline(text: str, colour: bool) -> str:
    # Code spans first: their content is literal (a "**" inside one is not bold).
    spans: list[str] = []

    def keep(match: re.Match[str]) -> str:
        spans.append(match.group(2))
        return f"\0{len(spans) - 1}\0"

    text = _CODE.sub(keep, text)
    text = _LINK.sub(lambda m: m.group(1) if m.group(1) == m.group(2) else f"{m[1]} ({m[2]})", text)
    text = _BOLD.sub(lambda m: f"{BOLD_ON}{m[1]}{BOLD_OFF}" if colour else f"[{m[1]}]", text)
    return re.sub(r"\0(\d+)\0", lambda m: spans[int(m.group(1))], text)


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)]


def _visible_len(text: str) -> int:
    return len(text.replace(BOLD_ON, "").replace(BOLD_OFF, ""))


def _table(lines: list[str], colour: bool) -> list[str]:
    rows = [[_inline(cell, colour) for cell in _cells(line)] for line in lines]
    has_header = len(lines) > 1 and bool(_TABLE_RULE.match(lines[1]))
    if has_header:
        rows.pop(1)
    width = max(len(row) for row in rows)
    rows = [row + [""] * (width - len(row)) for row in rows]
    sizes = [max(_visible_len(row[i]) for row in rows) for i in range(width)]

    def render(row: list[str]) -> str:
        cells = [cell + " " * (size - _visible_len(cell)) for cell, size in zip(row, sizes)]
        return "  ".join(cells).rstrip()

    out = [render(row) for row in rows]
    if has_header:
        out.insert(1, "  ".join("-" * size for size in sizes))
    return out


def markdown_for_terminal(markdown: str, colour: bool = False) -> str:
    """``markdown`` as plain text: headings underlined, tables aligned, no backticks."""
    out: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            out += _table(block, colour)
            continue
        heading = _HEADING.match(line)
        if heading:
            text = _inline(heading.group(2), colour)
            out += [text, ("=" if len(heading.group(1)) <= 2 else "-") * _visible_len(text)]
        else:
            out.append(_inline(line, colour))
        i += 1
    return "\n".join(out) + ("\n" if markdown.endswith("\n") else "")

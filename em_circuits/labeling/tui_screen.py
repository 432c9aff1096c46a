"""The labeling session's screen: the item on view, messages, and asking the person.

Messages are collected and shown together: on a terminal under the item's freshly drawn
screen (so that the screen fits), in a pipe as plain lines before the next question.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from em_circuits.core.schemas import QueueItemRecord, VerdictRecord
from em_circuits.core.store import ResultsStore
from em_circuits.labeling.tui_io import ScreenIO
from em_circuits.labeling.tui_render import render_item


class QuitSession(Exception):
    """The person asked to stop (``q`` or end of input)."""


@dataclass
class Visit:
    """One item on screen."""

    pid: str
    item: QueueItemRecord
    verdict: VerdictRecord
    text: str | None
    header: str
    edit: bool = False  # a saved item opened again (p)
    committed: bool = False
    undo: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    redraw: bool = False

    @property
    def draft(self) -> dict[str, Any]:
        return dict(self.item.get("draft") or {})

    @property
    def marks(self) -> dict[str, str]:
        return dict(self.draft.get("marks", {}))


class Screen:
    """Output and questions of one labeling session."""

    store: ResultsStore
    slug: str
    io: ScreenIO
    who: str  # this session, as written into the history it makes
    finished: list[str]  # the items left this session, the last one last (for p)
    pending: list[str]  # messages not shown yet

    def say(self, text: str = "") -> None:
        self.pending.extend(text.split("\n"))

    def flush(self) -> None:
        if self.pending:
            self.io.write("\n".join(self.pending) + "\n")
            self.pending = []

    def _read(self, read: Callable[[str], str], prompt: str) -> str:
        self.flush()
        try:
            return read(prompt).strip()
        except EOFError:
            raise QuitSession() from None

    def ask(self, prompt: str) -> str:
        """A text answer (line editing and history on a terminal)."""
        return self._read(self.io.text, prompt)

    def ask_command(self, prompt: str) -> str:
        """A command: on a terminal a single key, or a typed line."""
        return self._read(self.io.command, prompt)

    def ask_nonempty(self, prompt: str, what: str) -> str | None:
        """Ask until a non-empty answer; 'back' returns None."""
        while True:
            answer = self.ask(prompt)
            if answer.lower() == "back":
                return None
            if answer:
                return answer
            self.say(f"Please type {what} (or 'back' to return to the item).")

    def show(self, visit: Visit) -> None:
        """Draw the item: on a terminal, a cleared screen fitted to it with the messages
        under it; in a pipe, the whole item, then the messages."""
        if not self.io.interactive:
            self.flush()  # in a pipe, what was said comes first, in order
        width, height = self.io.size()
        footer, self.pending = self.pending, []
        draft = visit.item.get("draft") or {}
        lines = render_item(
            visit.header,
            visit.verdict,
            visit.text,
            draft,
            width=width,
            height=height,
            footer=footer,
        )
        self.io.clear()
        self.io.write("\n".join(lines) + "\n")

"""Terminal labeling session over the manual queue.

It runs on a real terminal through prompt_toolkit (single-key commands, line editing and
history, a screen fitted to the terminal) and falls back to plain ``input()``/``print()``
in a pipe (:mod:`~em_circuits.labeling.tui_io`). Every answer is written through
:mod:`em_circuits.labeling.items` and :mod:`~em_circuits.labeling.labels` the moment it is
given, so Ctrl-C, a closed terminal or ``q`` never loses anything already answered; the item
on screen comes back first next time.

Two sessions may run on one results directory: each leases the item it shows
(:mod:`~em_circuits.labeling.leases`) and is offered the items no live session holds, and
every write is checked against the version of the item that was shown, so an answer given on
a stale screen is refused (and said so), never written over another session's labels.
The commands are in :mod:`~em_circuits.labeling.tui_commands`; what the screen shows is in
:mod:`~em_circuits.labeling.tui_render`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

from em_circuits.core.labeling_records import (
    load_item,
    load_label,
    load_verdict,
    prompt_text,
    with_marks,
)
from em_circuits.core.store import ResultsStore
from em_circuits.labeling.items import (
    OPEN_STATES,
    QueueFilter,
    StaleItemError,
    describe_change,
    open_items,
    recover_interrupted,
    save_draft,
    start_item,
    status_counts,
)
from em_circuits.labeling.leases import LeaseKeeper, describe_holder
from em_circuits.labeling.tui_commands import SINGLE_KEYS, Commands
from em_circuits.labeling.tui_io import ScreenIO, make_io
from em_circuits.labeling.tui_render import HELP, rank_change
from em_circuits.labeling.tui_screen import QuitSession, Visit

__all__ = ["HELP", "QuitSession", "Session", "rank_change", "run_session"]


class Session(Commands):
    """One labeling session over the open items of one adapted model."""

    def __init__(
        self,
        store: ResultsStore,
        adapted_slug: str,
        flt: QueueFilter = QueueFilter(),
        *,
        ask: Callable[[str], str] | None = None,
        out: TextIO | None = None,
        io: ScreenIO | None = None,
    ):
        self.store = store
        self.slug = adapted_slug
        self.flt = flt
        self.io = io or make_io(SINGLE_KEYS, ask, out)
        self.keeper = LeaseKeeper(store, adapted_slug)
        self.who = self.keeper.holder.who
        self.outcomes: dict[str, str] = {}  # prompt id -> done / rejected / skipped
        self.finished: list[str] = []  # items left this session, last one last (for p)
        self.lost = 0  # answers refused because another session changed the item first
        self.pending: list[str] = []  # messages not shown yet
        self.positions: dict[str, int] = {}
        self.total = 0

    @property
    def counts(self) -> dict[str, int]:
        values = list(self.outcomes.values())
        return {state: values.count(state) for state in ("done", "rejected", "skipped")}

    # -- loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        """Label until the queue is empty or the person quits; returns counts by outcome.

        Each item is offered once per session, so skipping everything ends the session.
        """
        try:
            recovered = recover_interrupted(self.store, self.slug)
            if recovered:
                self.say(f"Recovered {recovered} answer(s) saved just before an interruption.")
            order = [item["prompt_id"] for item, _ in open_items(self.store, self.slug, self.flt)]
            if not order:
                self.say("Nothing to label: the queue has no open items (see --status).")
                self.flush()
                return self.counts
            self.positions = {pid: n for n, pid in enumerate(order, start=1)}
            self.total = len(order)
            self.say(f"{len(order)} item(s) to label. Type ? for help.")
            self._work(deque((pid, False) for pid in order))
        except QuitSession:
            self.say("Stopped. Everything answered is saved; this item comes back first.")
        finally:
            self.keeper.close()  # releases the lease: on q, Ctrl-C and a closed terminal
            self.io.close()
        self._summary()
        return self.counts

    def _work(self, todo: deque[tuple[str, bool]]) -> None:
        while todo:
            pid, edit = todo.popleft()
            outcome = self._visit(pid, edit)
            if outcome == "back":
                todo.appendleft((pid, edit))
                todo.appendleft((self.finished.pop(), True))
                continue
            if outcome in ("done", "rejected", "skipped"):
                self.outcomes[pid] = outcome
            if outcome is not None and outcome != "lost":
                if pid in self.finished:
                    self.finished.remove(pid)
                self.finished.append(pid)

    def _summary(self) -> None:
        left = status_counts(self.store, self.slug, self.flt)
        open_left = sum(left[s] for s in OPEN_STATES)
        counts = self.counts
        lost = f" {self.lost} answer(s) not saved (changed elsewhere)." if self.lost else ""
        self.say(
            f"This session: {counts['done']} labeled, {counts['rejected']} rejected, "
            f"{counts['skipped']} skipped.{lost} Open items left: {open_left}."
        )
        self.flush()

    def _visit(self, pid: str, edit: bool) -> str | None:
        """Lease the item and label it; None when it is not (or no longer) for this session."""
        lease = self.keeper.take(pid)
        if not lease.ok:
            holder = describe_holder(lease.holder or {})
            self.say(f"Prompt {pid} is open in another session ({holder}); offering the next.")
            return None
        if lease.took_over:
            gone = describe_holder(lease.took_over)
            self.say(f"Prompt {pid}: its session ({gone}) is gone or stalled; taking it over.")
        visit: Visit | None = None
        try:
            visit = self._open(pid, edit)
            return None if visit is None else self.label_item(visit)
        except StaleItemError as err:
            self.lost += 1
            self.say(
                f"Prompt {pid}: {describe_change(err.stored)}; your answer was not saved; "
                "showing the next item."
            )
            return "lost"
        finally:
            if visit is not None and visit.edit and not visit.committed:
                self._discard_edit(visit)
            self.keeper.drop()

    def _open(self, pid: str, edit: bool) -> Visit | None:
        item = load_item(self.store, self.slug, pid)
        verdict = load_verdict(self.store, self.slug, pid)
        if (
            item is None
            or verdict is None
            or item["model_fingerprint"] != verdict.get("model_fingerprint")
        ):
            return None
        text = prompt_text(self.store, self.slug, verdict)
        was = item["state"]
        if was in OPEN_STATES:
            try:
                item = start_item(self.store, self.slug, item, by=self.who)
            except StaleItemError:
                return None  # changed between reading and opening it: it is someone else's
            where = f"Item {self.positions.get(pid, '?')}/{self.total}"
            header = f"{where} · prompt {pid} · was {was} · {self.slug}"
            return Visit(pid, item, verdict, text, header)
        if not edit:
            return None  # answered elsewhere meanwhile
        labels = load_label(self.store, self.slug, pid)
        draft: dict[str, Any] = {"marks": {}}
        saved = "rejected" if was == "rejected" else "labeled"
        if labels is not None:
            if not labels.get("rejected"):
                tokens = {t["index"]: t["label"] for ts in labels["tokens"].values() for t in ts}
                draft["marks"] = with_marks(
                    verdict, {}, {i: lab for i, lab in tokens.items() if lab}
                )
            draft["explanations"] = {
                d["index"]: {"human_label": d["human_label"], "text": d["explanation"]}
                for d in labels.get("disagreements", [])
                if d.get("explanation")
            }
            if labels.get("note"):
                draft["note"] = labels["note"]
            saved += f" at {str(labels.get('labeled_at', '?'))[:19].replace('T', ' ')}"
            saved += f", version {labels.get('version', 1)}"
        try:
            item = save_draft(self.store, self.slug, item, draft)
        except StaleItemError:
            return None
        header = f"Editing prompt {pid} · {saved} · {self.slug}"
        return Visit(pid, item, verdict, text, header, edit=True)

    def _discard_edit(self, visit: Visit) -> None:
        """Leaving a saved item unsaved: its labels stay as they were, the draft goes."""
        try:
            save_draft(self.store, self.slug, visit.item, {})
        except StaleItemError:
            return
        if visit.undo:
            self.say(f"Prompt {visit.pid}: saved labels left unchanged (your edits discarded).")


def run_session(
    store: ResultsStore,
    adapted_slug: str,
    flt: QueueFilter = QueueFilter(),
    *,
    ask: Callable[[str], str] | None = None,
    out: TextIO | None = None,
) -> dict[str, int]:
    """Run an interactive labeling session; KeyboardInterrupt propagates (all saved already).

    On a terminal it uses the full screen; with ``ask``/``out`` (or in a pipe), plain lines.
    """
    return Session(store, adapted_slug, flt, ask=ask, out=out).run()

"""Terminal labeling command loop for the manual queue (plain input()/print()).

It works in any terminal or pty, and with piped input. Every answer is written through
:mod:`em_circuits.labeling.items` and :mod:`~em_circuits.labeling.labels` the moment it is
given, so Ctrl-C, a closed terminal or ``q`` never loses anything already answered; the item
on screen comes back first next time. What the screen shows is in
:mod:`em_circuits.labeling.tui_render`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from em_circuits.core.schemas import LABELS, Disagreement, QueueItemRecord, VerdictRecord
from em_circuits.core.store import ResultsStore
from em_circuits.labeling.artifacts import (
    QueueError,
    find_disagreements,
    human_labels_from_marks,
    judge_labels,
    load_item,
    load_verdict,
    prompt_text,
    resolve_indices,
)
from em_circuits.labeling.items import (
    OPEN_STATES,
    QueueFilter,
    open_items,
    recover_interrupted,
    save_draft,
    skip_item,
    start_item,
    status_counts,
)
from em_circuits.labeling.labels import commit_human_labels, commit_rejection
from em_circuits.labeling.tui_render import (  # noqa: F401  (HELP, rank_change stay importable here)
    HELP,
    SHORT_HELP,
    describe_marks,
    rank_change,
    render_item,
    show_token,
)

#: A command's handler: a str ends the item (its outcome), an item replaces the one shown.
Handler = Callable[[QueueItemRecord, VerdictRecord, str], Any]


class QuitSession(Exception):
    """The person asked to stop (``q`` or end of input)."""


class Session:
    """One labeling session over the open items of one adapted model."""

    def __init__(
        self,
        store: ResultsStore,
        adapted_slug: str,
        flt: QueueFilter = QueueFilter(),
        *,
        ask: Callable[[str], str] = input,
        out: TextIO | None = None,
    ):
        self.store = store
        self.slug = adapted_slug
        self.flt = flt
        self._ask = ask
        self.out = out or sys.stdout
        self.counts = {"done": 0, "rejected": 0, "skipped": 0}
        self._table: dict[str, Handler] | None = None

    # -- io ---------------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def ask(self, prompt: str) -> str:
        self.out.flush()
        try:
            return self._ask(prompt).strip()
        except EOFError:
            raise QuitSession() from None

    def ask_nonempty(self, prompt: str, what: str) -> str | None:
        """Ask until a non-empty answer; 'back' (or Ctrl-D) returns None."""
        while True:
            answer = self.ask(prompt)
            if answer.lower() == "back":
                return None
            if answer:
                return answer
            self.say(f"Please type {what} (or 'back' to return to the item).")

    # -- loop ---------------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        """Label until the queue is empty or the person quits; returns counts by outcome.

        Each item is offered once per session, so skipping everything ends the session.
        """
        recovered = recover_interrupted(self.store, self.slug)
        if recovered:
            self.say(f"Recovered {recovered} answer(s) saved just before an interruption.")
        order = [item["prompt_id"] for item, _ in open_items(self.store, self.slug, self.flt)]
        if not order:
            self.say("Nothing to label: the queue has no open items (see --status).")
            return self.counts
        self.say(f"{len(order)} item(s) to label. Type ? for help.")
        try:
            for position, pid in enumerate(order, start=1):
                item = load_item(self.store, self.slug, pid)
                verdict = load_verdict(self.store, self.slug, pid)
                if item is None or verdict is None or item["state"] not in OPEN_STATES:
                    continue  # answered elsewhere meanwhile
                outcome = self.label_item(item, verdict, position, len(order))
                self.counts[outcome] += 1
        except QuitSession:
            self.say("Stopped. Everything answered is saved; this item comes back first.")
        self._summary()
        return self.counts

    def _summary(self) -> None:
        left = status_counts(self.store, self.slug, self.flt)
        open_left = sum(left[s] for s in OPEN_STATES)
        self.say(
            f"This session: {self.counts['done']} labeled, {self.counts['rejected']} rejected, "
            f"{self.counts['skipped']} skipped. Open items left: {open_left}."
        )

    def label_item(
        self, item: QueueItemRecord, verdict: VerdictRecord, position: int, total: int
    ) -> str:
        """Show one item and run commands until it is labeled, rejected or skipped."""
        was = item["state"]
        item = start_item(self.store, self.slug, item)
        text = prompt_text(self.store, self.slug, verdict)
        self.say(render_item({**item, "was": was}, verdict, text, position, total))
        while True:
            line = self.ask("label> ")
            command, _, rest = line.partition(" ")
            command = command.lower()
            handler = self._handlers().get(command)
            if handler is None:
                self.say(
                    f"Unknown command {line!r}. Type ? for the list of commands."
                    if line
                    else SHORT_HELP
                )
                continue
            result = handler(item, verdict, rest.strip())
            if isinstance(result, str):
                return result
            if result is not None:
                item = result
            if command == "l":
                self.say(render_item({**item, "was": was}, verdict, text, position, total))

    def _handlers(self) -> dict[str, Handler]:
        if self._table is None:
            self._table = {
                "?": self._help,
                "h": self._help,
                "help": self._help,
                "a": self._accept,
                "e": self._mark("evil"),
                "u": self._mark("unsure"),
                "x": self._clear,
                "c": self._confirm,
                "r": self._reject,
                "n": self._note,
                "s": self._skip,
                "q": self._quit,
                "l": lambda *_: None,
            }
        return self._table

    # -- commands ---------------------------------------------------------------------------
    def _help(self, item: QueueItemRecord, verdict: VerdictRecord, rest: str) -> None:
        self.say(HELP)

    def _quit(self, item: QueueItemRecord, verdict: VerdictRecord, rest: str) -> None:
        raise QuitSession()

    def _skip(self, item: QueueItemRecord, verdict: VerdictRecord, rest: str) -> str:
        skip_item(self.store, self.slug, item)
        self.say("Skipped; it comes back after the pending items (your marks are kept).")
        return "skipped"

    def _mark(self, label: str) -> Handler:
        def handler(
            item: QueueItemRecord, verdict: VerdictRecord, rest: str
        ) -> QueueItemRecord | None:
            words = rest.replace(",", " ").split()
            if not words:
                self.say(f"Name the tokens to mark {label}, e.g. '{label[0]} T1 T3 B2'.")
                return None
            try:
                indices = resolve_indices(verdict, words)
            except QueueError as err:
                self.say(f"Nothing marked: {err}.")
                return None
            draft = dict(item.get("draft") or {})
            draft["marks"] = {**draft.get("marks", {}), **dict.fromkeys(indices, label)}
            item = save_draft(self.store, self.slug, item, draft)
            self.say(describe_marks(draft["marks"]))
            return item

        return handler

    def _clear(
        self, item: QueueItemRecord, verdict: VerdictRecord, rest: str
    ) -> QueueItemRecord | None:
        draft = dict(item.get("draft") or {})
        marks = dict(draft.get("marks", {}))
        if rest:
            try:
                for index in resolve_indices(verdict, rest.replace(",", " ").split()):
                    marks.pop(index, None)
            except QueueError as err:
                self.say(f"Nothing cleared: {err}.")
                return None
        else:
            marks = {}
        draft["marks"] = marks
        item = save_draft(self.store, self.slug, item, draft)
        self.say(describe_marks(marks))
        return item

    def _note(
        self, item: QueueItemRecord, verdict: VerdictRecord, rest: str
    ) -> QueueItemRecord | None:
        note = rest or self.ask_nonempty("note> ", "the note")
        if note is None:
            return None
        draft = {**(item.get("draft") or {}), "note": note}
        item = save_draft(self.store, self.slug, item, draft)
        self.say("Note saved.")
        return item

    def _reject(self, item: QueueItemRecord, verdict: VerdictRecord, rest: str) -> str | None:
        reason = rest or self.ask_nonempty("Why reject this prompt? reason> ", "a reason")
        if reason is None:
            return None
        note = (item.get("draft") or {}).get("note")
        path = self.store.labels_path(self.slug, item["prompt_id"])
        commit_rejection(self.store, self.slug, item, verdict, reason, note=note)
        self.say(f"Rejected; reason saved to {path}.")
        return "rejected"

    def _accept(self, item: QueueItemRecord, verdict: VerdictRecord, rest: str) -> str | None:
        judge = judge_labels(verdict)
        missing = [idx for idx, label in judge.items() if label is None]
        if missing:
            self.say(
                f"The judge gave no usable label for {' '.join(missing)}; "
                "mark the tokens yourself (e/u, then c)."
            )
            return None
        marks = (item.get("draft") or {}).get("marks")
        if (
            marks
            and self.ask("Discard your marks and accept the judge's labels? [y/N] ").lower() != "y"
        ):
            self.say("Kept your marks; type c to confirm them.")
            return None
        note = (item.get("draft") or {}).get("note")
        commit_human_labels(
            self.store,
            self.slug,
            item,
            verdict,
            {idx: label for idx, label in judge.items() if label is not None},
            note=note,
            source="terminal: accepted judge",
        )
        path = self.store.labels_path(self.slug, item["prompt_id"])
        self.say(f"Saved: judge labels accepted ({path}).")
        return "done"

    def _confirm(
        self, item: QueueItemRecord, verdict: VerdictRecord, rest: str
    ) -> str | QueueItemRecord | None:
        draft = dict(item.get("draft") or {})
        human = human_labels_from_marks(verdict, draft.get("marks", {}))
        disagreements = find_disagreements(verdict, human)
        explanations = None
        if disagreements:
            explanations, item = self._explain(item, verdict, disagreements)
            if explanations is None:
                return item
        commit_human_labels(
            self.store,
            self.slug,
            item,
            verdict,
            human,
            explanations=explanations,
            note=draft.get("note"),
        )
        counts = {lab: sum(1 for v in human.values() if v == lab) for lab in LABELS}
        self.say(
            f"Saved: {counts['evil']} evil, {counts['unsure']} unsure, {counts['safe']} safe; "
            f"{len(disagreements)} disagreement(s) with the judge."
        )
        return "done"

    def _explain(
        self, item: QueueItemRecord, verdict: VerdictRecord, disagreements: list[Disagreement]
    ) -> tuple[dict[str, str] | None, QueueItemRecord]:
        """Ask why the person disagrees; each answer is saved to the draft as it is given.

        Returns (explanations by index, or None if the person went back; the item).
        """
        draft = dict(item.get("draft") or {})
        saved = dict(draft.get("explanations", {}))

        def reusable(d: Disagreement) -> str | None:
            old = saved.get(d["index"])
            return old["text"] if old and old.get("human_label") == d["human_label"] else None

        self.say(f"You disagree with the judge on {len(disagreements)} token(s):")
        for d in disagreements:
            earlier = reusable(d)
            extra = f"   (explained before: {earlier})" if earlier else ""
            self.say(
                f"  {d['index']:<4}{show_token(d['token'])}  judge {d['judge_label']} → "
                f"you {d['human_label']}{extra}"
            )
        todo = [d for d in disagreements if reusable(d) is None]
        if todo:
            answer = self.ask_nonempty(
                "Why? One short explanation for all, or 'each' to explain token by token, "
                "or 'back' to change your marks.\nwhy> ",
                "a short explanation",
            )
            if answer is None:
                return None, item
            for d in todo:
                if answer.lower() == "each":
                    text = self.ask_nonempty(
                        f"why {d['index']} {show_token(d['token'])} (judge "
                        f"{d['judge_label']}, you {d['human_label']})> ",
                        "a short explanation",
                    )
                    if text is None:
                        return None, item
                else:
                    text = answer
                saved[d["index"]] = {"human_label": d["human_label"], "text": text}
                # Saved one by one, so an interruption keeps every explanation already typed.
                item = save_draft(self.store, self.slug, item, {**draft, "explanations": saved})
        return {d["index"]: saved[d["index"]]["text"] for d in disagreements}, item


def run_session(
    store: ResultsStore,
    adapted_slug: str,
    flt: QueueFilter = QueueFilter(),
    *,
    ask: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> dict[str, int]:
    """Run an interactive labeling session; KeyboardInterrupt propagates (all saved already)."""
    return Session(store, adapted_slug, flt, ask=ask, out=out).run()

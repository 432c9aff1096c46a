"""The labeling screen's commands: one item's command loop and what each command does.

A person's labels start as the judge's; the item's draft keeps only their changes (``marks``),
its note and the explanations typed so far, and is saved the moment it changes. Each change
can be undone (``z``). Saving writes the labels through :mod:`~em_circuits.labeling.labels`,
which refuses (StaleItemError) when the item changed since it was shown.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from em_circuits.core.labeling_records import (
    QueueError,
    entries_by_index,
    find_disagreements,
    judge_labels,
    resolve_indices,
    toggled,
    with_marks,
    working_labels,
)
from em_circuits.core.schemas import Disagreement
from em_circuits.core.verdicts import LABELS
from em_circuits.labeling.items import save_draft, skip_item
from em_circuits.labeling.labels import commit_human_labels, commit_rejection
from em_circuits.labeling.tui_render import HELP, SHORT_HELP, describe_marks, show_token
from em_circuits.labeling.tui_screen import QuitSession, Screen, Visit

#: Keys that act at once on an empty command line of a terminal (typed + Enter elsewhere).
SINGLE_KEYS = "acsrnqzp?lv"

_INDEX = re.compile(r"^[TtBb]?\d+$")

#: A handler's answer: an outcome ("done", "rejected", "skipped", "unchanged", "back") ends
#: the item; None keeps it on screen.
Handler = Callable[["Visit", str], "str | None"]


class Commands(Screen):
    """One item's commands (the session's loop is :class:`~em_circuits.labeling.tui.Session`)."""

    def label_item(self, visit: Visit) -> str:
        """Show one item and run commands until it is saved, rejected, skipped or left."""
        self.show(visit)
        while True:
            line = self.ask_command("label> ")
            command, _, rest = line.partition(" ")
            command = command.lower()
            if line and all(_INDEX.match(word) for word in line.replace(",", " ").split()):
                command, rest = "toggle", line
            handler = self._handlers().get(command)
            if handler is None:
                self.say(
                    f"Unknown command {line!r}. Type ? for the list of commands."
                    if line
                    else SHORT_HELP
                )
                self.flush()
                continue
            result = handler(visit, rest.strip())
            if result is not None:
                return result
            if visit.redraw and self.io.interactive:
                self.show(visit)
            else:
                self.flush()
            visit.redraw = False

    def _handlers(self) -> dict[str, Handler]:
        return {
            "?": self._help,
            "h": self._help,
            "help": self._help,
            "a": self._accept,
            "toggle": self._toggle,
            "e": self._mark("evil"),
            "u": self._mark("unsure"),
            "o": self._mark("safe"),
            "x": self._clear,
            "c": self._confirm,
            "r": self._reject,
            "n": self._note,
            "s": self._skip,
            "q": self._quit,
            "z": self._undo,
            "undo": self._undo,
            "p": self._back,
            "back": self._back,
            "l": self._redraw,
            "v": self._view_prompt,
        }

    # -- changes to the draft ---------------------------------------------------------------
    def _change(self, visit: Visit, draft: dict[str, Any], what: str) -> None:
        """Save a new draft at once, remembering the old one for undo."""
        visit.undo.append((what, visit.draft))
        visit.item = save_draft(self.store, self.slug, visit.item, draft)
        visit.redraw = True
        self.say(what)
        if not self.io.interactive:
            self.say(describe_marks(visit.marks))

    def _set_marks(self, visit: Visit, marks: dict[str, str], what: str) -> None:
        self._change(visit, {**visit.draft, "marks": marks}, what)

    def _toggle(self, visit: Visit, rest: str) -> str | None:
        try:
            indices = resolve_indices(visit.verdict, rest.replace(",", " ").split())
        except QueueError as err:
            self.say(f"Nothing changed: {err}.")
            return None
        marks, steps = visit.marks, []
        for index in indices:
            before = working_labels(visit.verdict, marks)[index]
            marks = toggled(visit.verdict, marks, index)
            steps.append(f"{index} {before} → {working_labels(visit.verdict, marks)[index]}")
        self._set_marks(visit, marks, "Toggled " + ", ".join(steps) + ".")
        return None

    def _mark(self, label: str) -> Handler:
        def handler(visit: Visit, rest: str) -> str | None:
            words = rest.replace(",", " ").split()
            if not words:
                if label == "unsure":  # a bare u is undo
                    return self._undo(visit, rest)
                self.say(f"Name the tokens to mark {label}, e.g. '{label[0]} T1 T3 B2'.")
                return None
            try:
                if [w.lower() for w in words] == ["all"]:
                    indices = list(entries_by_index(visit.verdict))
                else:
                    indices = resolve_indices(visit.verdict, words)
            except QueueError as err:
                self.say(f"Nothing marked: {err}.")
                return None
            marks = with_marks(visit.verdict, visit.marks, dict.fromkeys(indices, label))
            self._set_marks(visit, marks, f"Set {' '.join(indices)} {label}.")
            return None

        return handler

    def _clear(self, visit: Visit, rest: str) -> str | None:
        marks = visit.marks
        if rest:
            try:
                for index in resolve_indices(visit.verdict, rest.replace(",", " ").split()):
                    marks.pop(index, None)
            except QueueError as err:
                self.say(f"Nothing cleared: {err}.")
                return None
            what = f"{rest.upper()} back to the judge's labels."
        else:
            marks, what = {}, "All tokens back to the judge's labels."
        self._set_marks(visit, marks, what)
        return None

    def _note(self, visit: Visit, rest: str) -> str | None:
        note = rest or self.ask_nonempty("note> ", "the note")
        if note is not None:
            self._change(visit, {**visit.draft, "note": note}, "Note saved.")
        return None

    def _undo(self, visit: Visit, rest: str) -> str | None:
        if not visit.undo:
            self.say("Nothing to undo on this item (p goes back to the previous item).")
            return None
        what, old = visit.undo.pop()
        kept = {k: v for k, v in visit.draft.items() if k not in ("marks", "note")}
        restored: dict[str, Any] = {**kept, **{k: old[k] for k in ("marks", "note") if k in old}}
        visit.item = save_draft(self.store, self.slug, visit.item, restored)
        visit.redraw = True
        self.say(f"Undone: {what}")
        if not self.io.interactive:
            self.say(describe_marks(visit.marks))
        return None

    # -- other commands ---------------------------------------------------------------------
    def _help(self, visit: Visit, rest: str) -> str | None:
        self.say(HELP)
        return None

    def _redraw(self, visit: Visit, rest: str) -> str | None:
        if self.io.interactive:
            visit.redraw = True
        else:
            self.show(visit)
        return None

    def _view_prompt(self, visit: Visit, rest: str) -> str | None:
        self.say("Prompt:\n" + (visit.text or "(prompt text not found)"))
        return None

    def _quit(self, visit: Visit, rest: str) -> str | None:
        raise QuitSession()

    def _back(self, visit: Visit, rest: str) -> str | None:
        if not self.finished:
            self.say("Nothing before this item in this session.")
            return None
        if not visit.edit:
            self.say("This item keeps your changes and comes back next.")
        return "back"

    def _skip(self, visit: Visit, rest: str) -> str:
        if visit.edit:
            self.say(f"Prompt {visit.pid}: saved labels left as they were.")
            return "unchanged"
        skip_item(self.store, self.slug, visit.item, by=self.who)
        self.say("Skipped; it comes back after the pending items (your changes are kept).")
        return "skipped"

    def _reject(self, visit: Visit, rest: str) -> str | None:
        reason = rest or self.ask_nonempty("Why reject this prompt? reason> ", "a reason")
        if reason is None:
            return None
        note = visit.draft.get("note")
        commit_rejection(
            self.store, self.slug, visit.item, visit.verdict, reason, note=note, by=self.who
        )
        visit.committed = True
        path = self.store.labels_path(self.slug, visit.pid)
        self.say(f"Rejected; reason saved to {path}.")
        return "rejected"

    def _accept(self, visit: Visit, rest: str) -> str | None:
        judge = judge_labels(visit.verdict)
        missing = [idx for idx, label in judge.items() if label is None]
        if missing:
            self.say(
                f"The judge gave no usable label for {' '.join(missing)}; "
                "set those tokens yourself (T<n> toggles; e/u/o set), then c."
            )
            return None
        if (
            visit.marks
            and self.ask("Discard your changes and accept the judge's labels? [y/N] ")[:1].lower()
            != "y"
        ):
            self.say("Kept your changes; type c to save them.")
            return None
        self._save(visit, {i: lab for i, lab in judge.items() if lab}, None, "accepted judge")
        path = self.store.labels_path(self.slug, visit.pid)
        self.say(f"Saved: judge labels accepted ({path}).")
        return "done"

    def _confirm(self, visit: Visit, rest: str) -> str | None:
        human = working_labels(visit.verdict, visit.marks)
        disagreements = find_disagreements(visit.verdict, human)
        explanations = None
        if disagreements:
            explanations = self._explain(visit, disagreements)
            if explanations is None:
                visit.redraw = True  # back to the item, as it was
                return None
        self._save(visit, human, explanations, None)
        counts = {lab: sum(1 for v in human.values() if v == lab) for lab in LABELS}
        self.say(
            f"Saved: {counts['evil']} evil, {counts['unsure']} unsure, {counts['safe']} safe; "
            f"{len(disagreements)} disagreement(s) with the judge."
        )
        return "done"

    def _save(
        self,
        visit: Visit,
        human: dict[str, str],
        explanations: dict[str, str] | None,
        how: str | None,
    ) -> None:
        source = f"terminal: {how}" if how else "terminal"
        commit_human_labels(
            self.store,
            self.slug,
            visit.item,
            visit.verdict,
            human,
            explanations=explanations,
            note=visit.draft.get("note"),
            source=source,
            by=self.who,
        )
        visit.committed = True

    def _explain(self, visit: Visit, disagreements: list[Disagreement]) -> dict[str, str] | None:
        """Ask why the person disagrees; each answer is saved to the draft as it is given.

        Returns explanations by index, or None if the person went back.
        """
        saved = dict(visit.draft.get("explanations", {}))

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
                "or 'back' to change your labels.\nwhy> ",
                "a short explanation",
            )
            if answer is None:
                return None
            for d in todo:
                if answer.lower() == "each":
                    text = self.ask_nonempty(
                        f"why {d['index']} {show_token(d['token'])} (judge "
                        f"{d['judge_label']}, you {d['human_label']})> ",
                        "a short explanation",
                    )
                    if text is None:
                        return None
                else:
                    text = answer
                saved[d["index"]] = {"human_label": d["human_label"], "text": text}
                # Saved one by one, so an interruption keeps every explanation already typed.
                draft = {**visit.draft, "explanations": saved}
                visit.item = save_draft(self.store, self.slug, visit.item, draft)
        return {d["index"]: saved[d["index"]]["text"] for d in disagreements}

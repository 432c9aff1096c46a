"""The labeling program driven in a real pseudo-terminal: typing commands, reading the screen.

The program runs as a subprocess whose controlling terminal is a pty (tests/pty_terminal.py),
so single keys, Ctrl-C (\\x03) and a closed terminal reach it exactly as they do from a
person at a keyboard.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from pty_terminal import Terminal
from test_queue import MODEL_FLAGS, PYTHON, SCRIPT

from em_circuits.core.labeling_records import (
    find_disagreements,
    judge_labels,
    load_item,
    load_label,
    load_verdict,
    with_marks,
    working_labels,
)
from em_circuits.labeling.items import QueueFilter
from em_circuits.labeling.tui import rank_change, run_session
from em_circuits.labeling.tui_render import CODES, describe_marks


def scripted(out: io.StringIO, answers: list[str]):
    """An input() stand-in that shows its prompt and the typed answer, like a terminal."""
    pending = iter(answers)

    def ask(prompt: str) -> str:
        answer = next(pending)
        out.write(prompt + answer + "\n")
        return answer

    return ask


def start(results: Path, *args: str, rows: int = 24, cols: int = 80) -> Terminal:
    argv = [PYTHON, str(SCRIPT), "--results-dir", str(results), *MODEL_FLAGS, *args]
    return Terminal(argv, rows=rows, cols=cols)


def test_rank_change_marks():
    base_ranks = {1: 1, 2: 4}
    assert rank_change({"rank": 2, "token_id": 2}, base_ranks, adapted=True) == "↑2"
    assert rank_change({"rank": 3, "token_id": 1}, base_ranks, adapted=True) == "↓2"
    assert rank_change({"rank": 1, "token_id": 1}, base_ranks, adapted=True) == "="
    assert rank_change({"rank": 1, "token_id": 9}, base_ranks, adapted=True) == "new"
    assert rank_change({"rank": 1, "token_id": 9}, base_ranks, adapted=False) == "dropped"
    assert rank_change({"rank": 1, "token_id": 2}, base_ranks, adapted=False) == "→T4"


@pytest.mark.slow
def test_label_skip_reject_disagree_in_a_terminal(queue_setup):
    store, slug, order = queue_setup
    term = start(store.root)
    screen = term.expect("label> ")
    first = load_verdict(store, slug, order[0])
    text = store.load_prompt(order[0])["text"]
    assert f"Item 1/4 · prompt {order[0]}" in screen
    assert text.splitlines()[0] in screen
    judge = judge_labels(first)
    for e in first["labels"]["base"] + first["labels"]["adapted"]:
        code = CODES[judge[e["index"]]]  # the judge's label, then yours (the judge's at first)
        assert re.search(
            rf"{e['index']}\s+{re.escape(repr(e['token']))}\s+{e['logit']:.2f}\s+\S+\s+\S+\s+"
            rf"{code} {code}\s",
            screen,
        ), e
    assert "BASE list" in screen and "ADAPTED list" in screen and "vs base" in screen
    assert "J Y" in screen and (" E E" in screen or " U U" in screen)  # flagged: evil or unsure
    assert "new" in screen  # every fixture adapted list has an injected token

    help_text = term.type("?")
    assert "accept the judge's labels" in help_text and "skip" in help_text
    assert "there is no token T11: the adapted list has T1..T10" in term.type("e T1 T11")
    assert "cannot read 'Q3'" in term.type("u Q3")
    assert "Unknown command 'bogus'" in term.type("bogus")

    # Item 1: accept the judge. Item 2: skip. Item 3: own changes, explained token by token.
    assert "judge labels accepted" in term.type("a")  # a acts at once; the Enter is swallowed
    assert "Skipped" in term.type("s")
    v3 = load_verdict(store, slug, order[2])
    marks = with_marks(v3, {}, {"T1": "evil", "B2": "evil"})
    assert describe_marks(marks) in term.type("e T1, b2")
    marks = with_marks(v3, marks, {"T4": "unsure"})
    assert describe_marks(marks) in term.type("u 4")
    assert "Note saved." in term.type("n checked by hand")  # n opens the note prompt
    judge = judge_labels(v3)
    human = working_labels(v3, marks)
    disagree = [idx for idx in human if judge[idx] != human[idx]]
    assert "B2" in disagree  # the judge calls every B2 of the fixture safe
    shown = term.type("c", then="why> ")
    assert f"You disagree with the judge on {len(disagree)} token(s)" in shown
    term.type("each", then="> ")
    for n, idx in enumerate(disagree):
        prompt = "label> " if n == len(disagree) - 1 else "> "
        if n == 0:
            assert "Please type a short explanation" in term.type("", then="> ")
        term.type(f"reason for {idx}", then=prompt)

    # Item 4: reject, asked for the reason.
    term.type("r", then="reason> ")
    term.type("the scenario gives no room for harmful advice", then="labeled")
    assert term.wait() == 0
    assert "This session: 2 labeled, 1 rejected, 1 skipped" in term.screen

    lab1 = load_label(store, slug, order[0])
    assert lab1["labeled_by"] == "human" and lab1["disagreements"] == [] and lab1["version"] == 1
    assert lab1["human_verdict"]["adapted"] == first["verdict"]["adapted"]
    assert load_item(store, slug, order[1])["state"] == "skipped"
    assert load_label(store, slug, order[1]) is None
    lab3 = load_label(store, slug, order[2])
    assert {d["index"]: d["explanation"] for d in lab3["disagreements"]} == {
        idx: f"reason for {idx}" for idx in disagree
    }
    assert lab3["note"] == "checked by hand"
    labels3 = {t["index"]: t["label"] for ts in lab3["tokens"].values() for t in ts}
    assert labels3 == human
    lab4 = load_label(store, slug, order[3])
    assert lab4["rejected"] and lab4["reject_reason"].startswith("the scenario gives no room")
    assert load_item(store, slug, order[3])["state"] == "rejected"

    # Next run: the skipped item comes back (it is all that is left).
    term = start(store.root)
    assert f"prompt {order[1]}" in term.expect("label> ")
    term.type("q", then="Open items left: 1.")
    assert term.wait() == 0


@pytest.mark.slow
def test_ctrl_c_and_closed_terminal_lose_nothing(queue_setup):
    store, slug, order = queue_setup
    term = start(store.root)
    term.expect("label> ")
    term.type("a")  # item 1 answered
    term.type("e B2 B3")  # item 2: changes (the judge calls both safe), not yet saved
    term.ctrl_c()
    term.expect("Interrupted. Every answer given is saved")
    assert term.wait() == 130
    assert load_item(store, slug, order[0])["state"] == "done"
    item2 = load_item(store, slug, order[1])
    assert item2["state"] == "in_progress"
    assert item2["draft"]["marks"] == {"B2": "evil", "B3": "evil"}
    assert not any(store.queue_dir(slug).glob("*.lease"))  # Ctrl-C released the lease

    # Resume: the interrupted item is first, with its changes; Ctrl-C again while explaining.
    term = start(store.root)
    screen = term.expect("label> ")
    assert f"Item 1/3 · prompt {order[1]} · was in_progress" in screen
    assert "Your changes to the judge's labels: evil B2 B3." in screen
    verdict = load_verdict(store, slug, order[1])
    human = working_labels(verdict, {"B2": "evil", "B3": "evil"})
    disagree = [d["index"] for d in find_disagreements(verdict, human)]
    assert disagree == ["B2", "B3"]
    term.type("c", then="why> ")
    term.type("each", then="> ")
    term.type("first reason", then="> ")
    term.ctrl_c()
    assert term.wait() == 130
    draft = load_item(store, slug, order[1])["draft"]
    assert draft["explanations"][disagree[0]]["text"] == "first reason"

    # Resume again: the earlier explanation is reused, only the others are asked.
    term = start(store.root)
    term.expect("label> ")
    shown = term.type("c", then="why> ")
    assert "(explained before: first reason)" in shown
    term.type("the rest are fine")
    lab = load_label(store, slug, order[1])
    got = {d["index"]: d["explanation"] for d in lab["disagreements"]}
    assert got == {disagree[0]: "first reason", **dict.fromkeys(disagree[1:], "the rest are fine")}

    # Closing the terminal mid-item (SIGHUP) keeps the changes made on it, and the lease goes.
    term.type("u B2")
    term.close_terminal()
    item3 = load_item(store, slug, order[2])
    assert item3["state"] == "in_progress" and item3["draft"]["marks"] == {"B2": "unsure"}
    assert load_item(store, slug, order[1])["state"] == "done"
    assert not any(store.queue_dir(slug).glob("*.lease"))

    # A session after that starts with item 3 again (checked in-process: same code path).
    out = io.StringIO()
    run_session(store, slug, ask=scripted(out, ["q"]), out=out)
    assert f"prompt {order[2]} · was in_progress" in out.getvalue()


def test_back_from_explanation_and_accept_discarding_marks(queue_setup):
    store, slug, order = queue_setup
    out = io.StringIO()
    answers = ["x T1 T99", "e B2 B1", "x B1", "c", "back", "a", "y", "s", "s", "s"]
    counts = run_session(store, slug, ask=scripted(out, answers), out=out)
    screen = out.getvalue()
    assert "Nothing cleared: there is no token T99" in screen
    assert "Your changes to the judge's labels: evil B2. Type c to save." in screen
    assert "or 'back' to change your labels" in screen
    assert counts == {"done": 1, "rejected": 0, "skipped": 3}
    lab = load_label(store, slug, order[0])
    assert lab["disagreements"] == [] and lab["source"] == "terminal: accepted judge"
    assert "\x1b" not in screen  # plain lines: no terminal control codes


def test_filters_and_nothing_to_do(queue_setup):
    store, slug, order = queue_setup
    out = io.StringIO()
    run_session(store, slug, QueueFilter(only_divergent=True), ask=scripted(out, ["s"]), out=out)
    assert "1 item(s) to label" in out.getvalue()
    out = io.StringIO()
    run_session(store, "other--000000000000", ask=lambda prompt: "q", out=out)
    assert "Nothing to label" in out.getvalue()

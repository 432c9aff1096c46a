"""The labeling screen in a real terminal: concurrent sessions, toggling from the judge's
labels, undo, editing a saved label, an 80x24 terminal, and a plain pipe.

Every wait is for something the program writes (tests/pty_terminal.py), never a sleep. The
one stale screen is made deterministic: a session is stopped (SIGSTOP, as a suspended laptop
is) and its lease is made to look expired, as it would after a while without renewal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyte
import pytest
from pty_terminal import Terminal
from test_queue import MODEL_FLAGS, PYTHON, SCENARIOS, SCRIPT, make_results

from em_circuits.core.labeling_records import (
    TOGGLE_CYCLE,
    judge_labels,
    load_item,
    load_label,
    load_verdict,
    with_marks,
)
from em_circuits.labeling.items import enqueue_flagged
from em_circuits.labeling.leases import LEASE_SECONDS_ENV, lease_path, read_lease
from em_circuits.labeling.tui_render import describe_marks


def start(results: Path, rows: int = 24, cols: int = 80, env: dict | None = None) -> Terminal:
    argv = [PYTHON, str(SCRIPT), "--results-dir", str(results), *MODEL_FLAGS]
    return Terminal(argv, rows=rows, cols=cols, env=env)


def next_label(label: str) -> str:
    return TOGGLE_CYCLE[(TOGGLE_CYCLE.index(label) + 1) % len(TOGGLE_CYCLE)]


def flat(text: str) -> str:
    """Messages wrap to the terminal's width: compare them with whitespace collapsed."""
    return " ".join(text.split())


def token_labels(labels: dict) -> dict[str, str]:
    return {t["index"]: t["label"] for ts in labels["tokens"].values() for t in ts}


@pytest.mark.slow
def test_two_sessions_get_different_items_and_a_stale_answer_is_refused(queue_setup):
    store, slug, order = queue_setup
    # Its heartbeat stays quiet for the whole test, so it holds no lock when it is stopped.
    first = start(store.root, env={LEASE_SECONDS_ENV: "3600"})
    assert f"Item 1/4 · prompt {order[0]}" in first.expect("label> ")
    lease = read_lease(lease_path(store, slug, order[0]))
    assert lease is not None and lease["pid"] == first.proc.pid

    second = start(store.root)
    screen = flat(second.expect("label> "))
    assert f"Prompt {order[0]} is open in another session" in screen
    assert f"Item 2/4 · prompt {order[1]}" in screen
    assert "judge labels accepted" in second.key("a")  # second labels its item...
    assert f"prompt {order[2]}" in second.screen  # ...and holds the next one

    # The first session's screen goes stale: it is suspended, and its lease lapses meanwhile.
    os.kill(first.proc.pid, signal.SIGSTOP)
    try:
        path = lease_path(store, slug, order[0])
        expired = {**read_lease(path), "expires": time.time() - 1}
        path.write_text(json.dumps(expired), encoding="utf-8")

        # A third session is offered the lapsed item (the second's is taken), and labels it.
        third = start(store.root)
        screen = flat(third.expect("label> "))
        assert f"Prompt {order[2]} is open in another session" in screen
        assert f"prompt {order[0]}" in screen and "is gone or stalled; taking it over" in screen
        verdict = load_verdict(store, slug, order[0])
        toggled = next_label(judge_labels(verdict)["B2"])
        assert f"B2 safe → {toggled}" in third.type("B2")
        third.key("c", then="why> ")
        third.type("the third session says so")
        third.key("q", then="Open items left")
        assert third.wait() == 0
        second.key("q", then="Open items left")
        assert second.wait() == 0
        saved = load_label(store, slug, order[0])
        assert token_labels(saved)["B2"] == toggled
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)

    # Back on the stale screen: the answer is refused, said so, and the next item is shown.
    shown = flat(first.key("a"))
    assert f"Prompt {order[0]}: this item was labeled by another session" in shown
    assert "your answer was not saved; showing the next item" in shown
    assert f"prompt {order[2]}" in shown  # order[1] was labeled by the second session
    first.key("q", then="Open items left")
    assert first.wait() == 0
    assert "1 answer(s) not saved (changed elsewhere)" in first.screen
    assert load_label(store, slug, order[0]) == saved  # the third session's labels survive
    assert load_item(store, slug, order[0])["history"][-1]["event"] == "labeled (terminal)"
    assert not any(store.queue_dir(slug).glob("*.lease"))  # every session released its lease


@pytest.mark.slow
def test_toggle_from_judge_labels_undo_and_edit_a_saved_label(queue_setup):
    store, slug, order = queue_setup
    verdict = load_verdict(store, slug, order[0])
    judge = judge_labels(verdict)
    once, twice = next_label(judge["T1"]), next_label(next_label(judge["T1"]))
    term = start(store.root)
    assert "Your labels: the judge's, unchanged" in term.expect("label> ")
    assert f"Toggled T1 {judge['T1']} → {once}" in term.type("T1")
    assert f"Toggled T1 {once} → {twice}" in term.type("t1")
    assert f"Undone: Toggled T1 {once} → {twice}" in term.key("z")  # single key, no Enter
    shown = term.type("b2 3")  # toggles two more: B2 and T3
    b2, t3 = next_label(judge["B2"]), next_label(judge["T3"])
    assert f"Toggled B2 {judge['B2']} → {b2}, T3 {judge['T3']} → {t3}" in shown
    assert "Undone: Toggled B2" in term.type("u")  # a bare u is undo too
    assert f"Undone: Toggled T1 {judge['T1']} → {once}" in term.key("z")
    assert "Nothing to undo on this item" in term.key("z")
    assert f"Toggled T1 {judge['T1']} → {once}" in term.type("T1")
    assert "Toggled B2 safe → unsure" in term.type("B2")  # the judge calls every B2 safe
    assert "You disagree with the judge on 2 token(s)" in term.key("c", then="why> ")
    screen = term.type("T1 and B2 read wrong to me")
    assert f"Item 2/4 · prompt {order[1]}" in screen
    saved = load_label(store, slug, order[0])
    expected = {**judge, "T1": once, "B2": "unsure"}
    assert token_labels(saved) == expected and saved["version"] == 1

    # Back to the saved item: it opens with the saved labels; change one, save a new version.
    screen = flat(term.key("p"))
    assert f"Editing prompt {order[0]} · labeled at" in screen and "version 1" in screen
    assert describe_marks(with_marks(verdict, {}, {"T1": once, "B2": "unsure"})) in screen
    term.type("x B2")  # B2 back to the judge's label
    shown = flat(term.key("c"))  # T1's explanation is reused: nothing to ask
    assert "(explained before: T1 and B2 read wrong to me)" in shown
    assert f"Item 2/4 · prompt {order[1]} · was in_progress" in shown  # back where it was
    relabeled = load_label(store, slug, order[0])
    assert token_labels(relabeled) == {**expected, "B2": judge["B2"]}
    assert relabeled["version"] == 2
    assert relabeled["history"][0]["version"] == 1
    assert relabeled["history"][0]["labels"] == expected
    events = [h.get("event") for h in load_item(store, slug, order[0])["history"]]
    assert events[-1] == "relabeled (terminal)" and "labeled (terminal)" in events
    term.key("q", then="Open items left: 3.")
    assert term.wait() == 0
    assert "This session: 1 labeled, 0 rejected, 0 skipped." in term.screen


@pytest.mark.slow
def test_80x24_terminal_keeps_prompt_end_and_both_lists_on_screen(results_dir):
    story = " ".join(["The neighbour kept talking about the weather and the garden."] * 3)
    text = "\n".join(f"User: part {n}. {story}" for n in range(12))
    text += "\nUser: My chest hurts when I climb stairs.\nAssistant: You should"
    store, slug, _ = make_results(results_dir, [(text, *SCENARIOS[0][1:])])
    enqueue_flagged(store, slug)
    term = start(store.root, rows=24, cols=80)
    term.expect("label> ")
    for command in (None, "T1", "e T2 B9"):  # the first screen, and after two changes
        if command:
            term.type(command)
        screen = pyte.Screen(80, 24)
        pyte.ByteStream(screen).feed(term._bytes)
        rows = [row.rstrip() for row in screen.display]
        visible = "\n".join(rows)
        assert "Assistant: You should" in visible, visible  # the prompt's last line
        assert "User: My chest hurts when I climb stairs." in visible
        assert "Prompt (end;" in visible and "Item 1/1" in visible
        for n in range(1, 11):
            row = next((r for r in rows if r.startswith(f"B{n} ")), None)
            assert row is not None and f"│ T{n} " in row, visible  # both lists, side by side
        assert rows[screen.cursor.y].startswith("label>"), visible
        assert all(len(r) < 80 for r in rows)
    assert "Toggled T1" in visible or "Set T2 B9 evil" in visible
    term.key("q", then="Open items left")
    assert term.wait() == 0


@pytest.mark.slow
def test_plain_pipe_works_without_a_terminal(queue_setup):
    store, slug, order = queue_setup
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [PYTHON, str(SCRIPT), "--results-dir", str(store.root), *MODEL_FLAGS],
        input="B2\nc\npiped reason\nq\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Toggled B2 safe → unsure" in proc.stdout
    assert "\x1b" not in proc.stdout  # no terminal control codes in a pipe
    labels = load_label(store, slug, order[0])
    assert token_labels(labels)["B2"] == "unsure"
    assert labels["disagreements"][0]["explanation"] == "piped reason"

"""Item leases and versioned writes of the labeling queue, in-process (no terminal)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from test_queue import make_results, run_cli

from em_circuits.core.labeling_records import (
    judge_labels,
    load_item,
    load_label,
    load_verdict,
    toggled,
    working_labels,
)
from em_circuits.labeling.items import (
    StaleItemError,
    enqueue_flagged,
    save_draft,
    set_state,
    start_item,
)
from em_circuits.labeling.labels import auto_accept_judge, commit_human_labels, commit_rejection
from em_circuits.labeling.leases import (
    LEASE_SECONDS_ENV,
    Holder,
    LeaseKeeper,
    acquire,
    held_by_other,
    lease_path,
    read_lease,
    release,
)


@pytest.fixture()
def queued(results_dir):
    store, slug, pids = make_results(results_dir)
    enqueue_flagged(store, slug)
    return store, slug, pids


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _rewrite(path, **changes) -> None:
    path.write_text(json.dumps({**read_lease(path), **changes}), encoding="utf-8")


def test_a_live_lease_keeps_other_sessions_out(queued):
    store, slug, pids = queued
    one, two = Holder(), Holder()
    assert acquire(store, slug, pids[0], one).ok
    assert acquire(store, slug, pids[0], one).ok  # renewing one's own lease
    refused = acquire(store, slug, pids[0], two)
    assert not refused.ok and refused.holder["session"] == one.session
    assert held_by_other(store, slug, pids[0], two)["session"] == one.session
    assert held_by_other(store, slug, pids[0], one) is None
    release(store, slug, pids[0], two)  # not two's: left alone
    assert lease_path(store, slug, pids[0]).exists()
    release(store, slug, pids[0], one)
    assert not lease_path(store, slug, pids[0]).exists()
    assert acquire(store, slug, pids[0], two).ok


@pytest.mark.parametrize("how", ["dead pid", "reused pid", "expired", "unreadable"])
def test_a_dead_or_expired_lease_is_taken_over(queued, how):
    store, slug, pids = queued
    gone, me = Holder(), Holder()
    assert acquire(store, slug, pids[0], gone).ok
    path = lease_path(store, slug, pids[0])
    if how == "dead pid":
        _rewrite(path, pid=_dead_pid())
    elif how == "reused pid":
        _rewrite(path, proc_start=-1)  # the PID now belongs to another process
    elif how == "expired":
        _rewrite(path, expires=time.time() - 1)
    else:
        path.write_text("{half a lea", encoding="utf-8")
    result = acquire(store, slug, pids[0], me)
    assert result.ok and result.took_over is not None
    assert read_lease(path)["session"] == me.session


def test_a_stale_write_is_refused_and_changes_nothing(queued):
    store, slug, pids = queued
    verdict = load_verdict(store, slug, pids[0])
    shown = start_item(store, slug, load_item(store, slug, pids[0]))  # session A's screen
    # Meanwhile session B opens the same item and labels it.
    theirs = start_item(store, slug, load_item(store, slug, pids[0]), by="b@host pid 2")
    human_b = working_labels(verdict, toggled(verdict, {}, "B2"))
    commit_human_labels(store, slug, theirs, verdict, human_b, by="b@host pid 2")
    saved, item = load_label(store, slug, pids[0]), load_item(store, slug, pids[0])

    with pytest.raises(StaleItemError, match=r"labeled by another session \(b@host pid 2\)"):
        commit_human_labels(store, slug, shown, verdict, judge_labels(verdict))
    with pytest.raises(StaleItemError):
        commit_rejection(store, slug, shown, verdict, "too late")
    with pytest.raises(StaleItemError):
        save_draft(store, slug, shown, {"marks": {"T1": "safe"}})
    with pytest.raises(StaleItemError):
        set_state(store, slug, shown, "skipped")
    assert load_label(store, slug, pids[0]) == saved
    assert load_item(store, slug, pids[0]) == item
    assert item["version"] == 4  # enqueued, opened twice, labeled


def test_relabeling_keeps_the_earlier_versions(queued):
    store, slug, pids = queued
    verdict = load_verdict(store, slug, pids[1])
    item = start_item(store, slug, load_item(store, slug, pids[1]))
    first = commit_human_labels(store, slug, item, verdict, judge_labels(verdict))
    again = working_labels(verdict, toggled(verdict, {}, "T1"))
    second = commit_human_labels(
        store, slug, load_item(store, slug, pids[1]), verdict, again, explanations={"T1": "no"}
    )
    assert (first["version"], second["version"]) == (1, 2)
    assert second["history"] == [
        {
            "version": 1,
            "labeled_by": "human",
            "labeled_at": first["labeled_at"],
            "source": "terminal",
            "labels": judge_labels(verdict),
            "rejected": False,
            "reject_reason": None,
            "note": None,
        }
    ]
    rejected = commit_rejection(store, slug, load_item(store, slug, pids[1]), verdict, "odd")
    assert rejected["version"] == 3 and load_item(store, slug, pids[1])["state"] == "rejected"
    events = [h.get("event") for h in load_item(store, slug, pids[1])["history"]]
    assert events[-3:] == ["labeled (terminal)", "relabeled (terminal)", "rejected"]


def test_auto_accept_and_status_leave_items_a_session_is_showing(queued):
    store, slug, pids = queued
    holder = Holder()
    assert acquire(store, slug, pids[0], holder).ok
    shown = run_cli(store.root, "--status").stdout
    assert f"prompt {pids[0]} is open in a labeling session ({holder.who}" in shown
    assert auto_accept_judge(store, slug) == 3
    assert load_label(store, slug, pids[0]) is None
    release(store, slug, pids[0], holder)
    assert auto_accept_judge(store, slug) == 1


def test_keeper_renews_its_lease_and_notices_a_takeover(queued, monkeypatch):
    store, slug, pids = queued
    monkeypatch.setenv(LEASE_SECONDS_ENV, "2")  # a heartbeat every 0.5 s
    keeper = LeaseKeeper(store, slug)
    try:
        assert keeper.take(pids[0]).ok
        path = lease_path(store, slug, pids[0])
        first = read_lease(path)["expires"]
        deadline = time.monotonic() + 60
        while read_lease(path)["expires"] == first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.1)
        _rewrite(path, expires=time.time() - 1)  # it lapsed (say the machine slept)...
        assert acquire(store, slug, pids[0], Holder()).ok  # ...and another session took it
        while not keeper.lost:
            assert time.monotonic() < deadline, "the takeover went unnoticed"
            time.sleep(0.1)
        assert read_lease(path)["session"] != keeper.holder.session  # not renewed over it
        assert keeper.take(pids[1]).ok  # the next item; the lost lease is not touched
        assert lease_path(store, slug, pids[0]).exists()
    finally:
        keeper.close()
    assert not lease_path(store, slug, pids[1]).exists()

"""One lock per results directory and stage: concurrent runs of a stage never do its work twice.

Every test coordinates its processes by what they print (a waiter logs that it waits; a holder
prints that it holds), never by sleeping, so none depends on machine speed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from unprivileged import unprivileged

from em_circuits.core.stage_lock import StageBusyError, lock_path, stage_lock
from em_circuits.core.store import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 120  # generous: only a broken lock ever waits this long


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("OPENAI_API_KEY", None)
    return env


def _em(*args: str) -> list[str]:
    return [sys.executable, "-m", "em_circuits.cli.main", *args]


class Watched:
    """A subprocess whose stderr is collected by a thread; ``saw(text)`` waits for a line."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str]):
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._new = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()
        with self._new:
            self.lines.append("<eof>")
            self._new.notify_all()

    def saw(self, text: str, timeout: float = WAIT_S) -> bool:
        with self._new:
            return self._new.wait_for(
                lambda: any(text in line or line == "<eof>" for line in self.lines), timeout
            ) and any(text in line for line in self.lines)

    def finish(self) -> tuple[int, str, str]:
        out = self.proc.stdout.read() if self.proc.stdout else ""
        code = self.proc.wait(timeout=WAIT_S)
        self._thread.join(timeout=10)
        return code, out, "".join(self.lines)


def test_two_prompts_runs_started_together_store_n_prompts_not_2n(tmp_path):
    """Both start while the lock is held (by this test, standing in for a slow first run), so
    both snapshot the store, then wait; the second to get the lock counts the first's six."""
    results = tmp_path / "results"
    results.mkdir()
    (tmp_path / ".env").write_text("")  # no key: the offline generator
    env = _env(tmp_path)
    cmd = _em("prompts", "-n", "6", "--generator", "offline", "--results-dir", str(results))
    with stage_lock(results, "prompts"):
        runs = [Watched(cmd, tmp_path, env) for _ in range(2)]
        both_waiting = [run.saw("waiting for") for run in runs]
    done = [run.finish() for run in runs]
    assert both_waiting == [True, True], [d[2][-2000:] for d in done]
    assert [code for code, _, _ in done] == [0, 0], [d[2][-2000:] for d in done]
    assert len(ResultsStore(results).prompt_ids()) == 6
    saved = sorted(out.splitlines()[0] for _, out, _ in done)
    assert saved == ["saved 0 new prompt(s)", "saved 6 new prompt(s)"]


@pytest.mark.slow  # two processes load both micro models
def test_two_evaluate_runs_started_together_compute_the_logits_once(micro_organism, tmp_path):
    """The second to get the lock finds every logit and verdict stored by the first."""
    from micro_flags import model_args

    from em_circuits.prompts.dedup import Deduper
    from em_circuits.prompts.sources import generate_offline_prompts

    results = tmp_path / "results"
    store = ResultsStore(results)
    assert len(generate_offline_prompts(store, 4, Deduper.from_store(store)).saved) == 4
    (tmp_path / ".env").write_text("")  # the offline judge
    cmd = _em("evaluate", "--results-dir", str(results), *model_args(micro_organism))
    with stage_lock(results, "evaluate"):
        runs = [Watched(cmd, tmp_path, _env(tmp_path)) for _ in range(2)]
        both_waiting = [run.saw("waiting for") for run in runs]
    done = [run.finish() for run in runs]
    assert both_waiting == [True, True], [d[2][-2000:] for d in done]
    assert [code for code, _, _ in done] == [0, 0], [d[2][-2000:] for d in done]
    outs = sorted((out for _, out, _ in done), key=lambda out: "4 written" not in out)
    assert "verdicts: 4 written, 0 up to date" in outs[0]
    assert outs[0].count(": 4 computed, 0 cached") == 2  # base and adapted
    assert "verdicts: 0 written, 4 up to date" in outs[1]
    assert outs[1].count(": 0 computed, 4 cached") == 2


def test_no_wait_refuses_in_one_line_naming_the_holder(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (tmp_path / ".env").write_text("")
    cmd = _em("prompts", "-n", "2", "--no-wait", "--results-dir", str(results))
    with stage_lock(results, "prompts", command="em-circuits prompts -n 40"):
        done = subprocess.run(
            cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=WAIT_S
        )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: prompts is already running")
    assert "em-circuits prompts -n 40" in errors[0] and f"pid {os.getpid()}" in errors[0]
    assert ResultsStore(results).prompt_ids() == []


def _lock_holder(results: Path, stage: str, tmp_path: Path) -> subprocess.Popen[str]:
    """Another process that holds ``stage``'s lock on ``results`` (until killed)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from em_circuits.core.stage_lock import stage_lock\n"
            f"with stage_lock({str(results)!r}, {stage!r}):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n",
        ],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
    )
    if holder.stdout is None or holder.stdout.readline().strip() != "held":
        holder.kill()
        raise AssertionError(f"the holder of {stage}'s lock did not start")
    return holder


def test_a_killed_holder_releases_the_lock(tmp_path):
    results = tmp_path / "results"
    holder = _lock_holder(results, "evaluate", tmp_path)
    try:
        with pytest.raises(StageBusyError, match="evaluate is already running"):
            with stage_lock(results, "evaluate", wait=False):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=WAIT_S)
    with stage_lock(results, "evaluate", wait=False) as lock:  # the kernel dropped it
        assert lock.held and not lock.waited


def test_the_lock_is_reentrant_in_one_process_and_per_stage(tmp_path):
    with stage_lock(tmp_path, "graphs") as outer:
        with stage_lock(tmp_path, "graphs", wait=False) as inner:  # `run` inside a stage call
            assert outer.held and inner.held
        with stage_lock(tmp_path, "report", wait=False) as other:
            assert other.held
        link = tmp_path.parent / f"{tmp_path.name}-link"
        link.symlink_to(tmp_path)
        with stage_lock(link, "graphs", wait=False) as same:  # the same folder, other spelling
            assert same.held
    assert lock_path(tmp_path, "graphs").is_file()


def test_the_run_pipeline_takes_each_stage_lock(tmp_path):
    """`run` holds the stage's lock as it enters it: a stage another process holds is refused
    with --no-wait (and waited for without it)."""
    from em_circuits.run.pipeline import STAGE_LOCKS, PipelineConfig, stage

    results = tmp_path / "results"
    store = ResultsStore(results)
    holder = _lock_holder(results, "analyze", tmp_path)
    try:
        assert STAGE_LOCKS["features"] == "analyze"
        with pytest.raises(StageBusyError, match="analyze is already running"):
            with stage("features", store, PipelineConfig(wait=False)):
                pass
        with stage("prompts", store, PipelineConfig(wait=False)):  # another stage: free
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=WAIT_S)


def test_a_read_only_results_dir_skips_the_lock(tmp_path):
    """Nothing can be written there anyway: the stage runs (reading) without a lock."""
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o555)
    code = (
        "from em_circuits.core.stage_lock import stage_lock\n"
        f"with stage_lock({str(results)!r}, 'report', wait=False) as lock:\n"
        "    print('held' if lock.held else 'skipped')\n"
    )
    try:
        done = subprocess.run(
            [*unprivileged(), sys.executable, "-c", code],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
    finally:
        results.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "skipped"
    assert not (results / ".locks").exists()


def test_label_import_skips_items_a_live_session_holds(tmp_path, caplog, capsys):
    """An item a labeling session shows keeps its session's answer: --import leaves it, with
    a warning, and imports the others."""
    import csv

    from test_queue import MODEL_FLAGS, _fill, _write_csv, make_results

    from em_circuits.cli.main import main
    from em_circuits.core.labeling_records import load_label
    from em_circuits.labeling.exchange import export_queue, import_labels
    from em_circuits.labeling.items import enqueue_flagged
    from em_circuits.labeling.leases import Holder, acquire, release

    store, slug, pids = make_results(tmp_path / "results")
    enqueue_flagged(store, slug)
    todo = tmp_path / "todo.csv"
    export_queue(store, slug, todo)
    with open(todo, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    _fill(rows, pids[0], {"T1": "evil"})
    _fill(rows, pids[1], {"T1": "evil"})
    _write_csv(todo, rows)
    session = Holder()
    assert acquire(store, slug, pids[0], session).ok
    try:
        with caplog.at_level(logging.WARNING):
            code = main(
                ["label", "--import", str(todo), "--results-dir", str(store.root), *MODEL_FLAGS]
            )
    finally:
        release(store, slug, pids[0], session)
    out = capsys.readouterr().out
    assert code == 0
    assert "Imported labels for 1 prompt(s)" in out
    assert "Skipped 1 prompt(s) open in a labeling session" in out
    assert any(f"prompt {pids[0]} is open in a labeling session" in m for m in caplog.messages)
    assert load_label(store, slug, pids[0]) is None
    assert load_label(store, slug, pids[1])["labeled_by"] == "human"
    # Once the session has moved on, importing the same file labels it.
    assert import_labels(store, slug, todo) == {"imported": 1, "unchanged": 1, "held": 0}

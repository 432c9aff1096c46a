"""Nothing lost, nothing silent: deadlines, file modes, leftovers of killed runs, damaged
graphs, read-only results, two pipelines on one directory, and one-line errors.

Real files, real subprocesses (the ``em-circuits`` command on the micro organism) and a real
local OpenAI-compatible HTTP server. Waits are generous and end on an observed event (a log
line, a process exit), never on a guessed duration.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from micro_flags import model_args
from openai_server import OpenAIServer, reply_error, reply_json, reply_slow
from test_prompts import generated
from unprivileged import unprivileged

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-robustness"


def _env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("OPENAI_API_KEY", None)
    env.pop("OPENAI_BASE_URL", None)
    env.pop("EM_CIRCUITS_CRASH_AFTER", None)
    env.update(extra)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "em_circuits.cli.main", *args]


ANALYSIS_ARGS = [
    "--causal-top-k",
    "2",
    "--scales",
    "0",
    "1",
    "--n-random",
    "1",
    "--causal-candidates",
    "4",
    "--include-flagged",  # the micro organism has no divergent prompt
    "--em-samples",
    "3",
    "--em-max-new-tokens",
    "12",
    "--corpus-docs",
    "48",
]
PIPELINE_ARGS = ["--n-prompts", "8", "--max-feature-nodes", "120", *ANALYSIS_ARGS]


def _run(command: list[str], env: dict[str, str] | None = None, timeout: int = 600, **kw):
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=env or _env(),
        cwd=ROOT,
        timeout=timeout,
        **kw,
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> str:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = _error_lines(done.stderr)
    assert len(errors) == 1, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# -- 2. deadlines and progress of LLM calls --------------------------------------------------------
@pytest.fixture()
def server():
    with OpenAIServer() as srv:
        yield srv


def _client(server, **options):
    from em_circuits.core.llm import LLMClient

    settings = {
        "model": "test-model",
        "api_key": KEY,
        "base_url": server.base_url,
        "timeout": 30.0,
        "max_tries": 5,
        "backoff_base": 0.01,
        **options,
    }
    return LLMClient(**settings)


def _ask(client, what="judging prompt p-slow"):
    return client.chat_json(
        [{"role": "user", "content": "hi"}], lambda x: x, json_schema={"type": "object"}, what=what
    )


@pytest.mark.slow
def test_a_call_deadline_bounds_every_retry_together_with_one_clear_error(server):
    from em_circuits.core.llm_errors import LLMError

    # Every reply arrives just after the per-request timeout: without an overall deadline the
    # client would wait max_tries x timeout.
    server.default = reply_slow(3.0, reply_json({"ok": True}))
    client = _client(server, timeout=2.0, max_tries=10, deadline=3.0)
    started = time.monotonic()
    with pytest.raises(LLMError) as caught:
        _ask(client)
    elapsed = time.monotonic() - started
    assert type(caught.value).__name__ == "LLMDeadlineError"
    message = str(caught.value)
    assert "\n" not in message
    assert "judging prompt p-slow" in message and "--llm-deadline" in message
    assert "3 s" in message
    assert len(server.requests) < 10
    assert elapsed < 15, f"the deadline of 3 s took {elapsed:.1f} s"


def test_a_run_deadline_that_has_passed_stops_before_any_request(server):
    from em_circuits.core.llm_errors import LLMError

    client = _client(server, run_deadline=5.0, run_started=time.monotonic() - 10.0)
    with pytest.raises(LLMError, match="--run-deadline"):
        _ask(client)
    assert server.requests == []


def test_waiting_and_retrying_are_logged_with_the_call_and_the_time(server, caplog):
    # Slow, then a server error, then an answer: the wait and the retry are both visible.
    server.push(reply_slow(2.0, reply_error(503, "overloaded")), reply_json({"ok": True}))
    client = _client(server, progress_every=0.3, sleep=lambda s: None)
    with caplog.at_level(logging.WARNING, logger="em_circuits.core.llm"):
        value, _, _ = _ask(client, what="judging prompt p-visible")
    assert value == {"ok": True}
    waiting = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert waiting and all("judging prompt p-visible" in line for line in waiting)
    assert re.search(r"\d+ s on try 1/5", waiting[0]), waiting[0]
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 1
    assert "judging prompt p-visible" in retries[0] and "HTTP 503" in retries[0]
    assert "since the call began" in retries[0]


@pytest.mark.slow
def test_prompts_command_stops_at_its_deadline_and_keeps_what_it_made(server, tmp_path):
    results = tmp_path / "results"
    server.push(reply_json(generated("lost_wallet", "I found a wallet full of cash. I will")))
    server.default = reply_slow(20.0, reply_json(generated("late", "Too late to matter, I")))
    started = time.monotonic()
    done = _run(
        _cli(
            "prompts",
            "--results-dir",
            str(results),
            "--generator",
            "llm",
            "--format",
            "raw",
            "-n",
            "3",
            "--llm-model",
            "test-model",
            "--base-url",
            server.base_url,
            "--timeout",
            "15",
            "--llm-deadline",
            "3",
        ),
        _env(OPENAI_API_KEY=KEY),
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-3000:]
    error = _assert_one_line_error(done, "--llm-deadline", "generating prompt 2 of 3")
    assert "1 prompt(s) saved before it are kept" in error
    assert len(list((results / "prompts").glob("*.json"))) == 1
    assert elapsed < 15 + 60, f"the command took {elapsed:.0f} s"  # one timeout, not 5


# -- 3. file modes follow the umask ----------------------------------------------------------------
@pytest.fixture()
def umask_002():
    old = os.umask(0o002)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _modes_under(root: Path) -> dict[str, int]:
    """Mode of every artifact (hidden lock and claim files excepted) and every folder."""
    modes = {".": _mode(root)}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and any(part.startswith(".") for part in rel.parts):
            continue
        modes[str(rel)] = _mode(path)
    return modes


def test_atomic_writes_honour_the_umask(tmp_path, umask_002):
    import torch
    from safetensors.torch import save_file

    from em_circuits.core.atomic import atomic_path, atomic_write_text
    from em_circuits.core.store import write_artifact

    atomic_write_text(tmp_path / "a.txt", "text")
    write_artifact(tmp_path / "t.json", "table", {"n": 1})
    with atomic_path(tmp_path / "g.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))  # safetensors itself writes 0600
    assert _mode(tmp_path / "a.txt") == 0o664
    assert _mode(tmp_path / "t.json") == 0o664
    assert _mode(tmp_path / "g.safetensors") == 0o664
    os.umask(0o027)
    atomic_write_text(tmp_path / "b.txt", "text")
    assert _mode(tmp_path / "b.txt") == 0o640


def test_merged_weights_are_readable_by_the_group(micro_specs, tmp_path, umask_002):
    import torch

    from em_circuits.models.merge import merge_adapter

    _, adapted = micro_specs
    merge_adapter(adapted, tmp_path / "merged", torch.float32)
    modes = _modes_under(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    wrong = {p: oct(m) for p, m in modes.items() if m not in (0o664, 0o775)}
    assert not wrong, wrong


def test_organism_weights_follow_the_umask(micro_organism):
    umask = os.umask(0o022)
    os.umask(umask)
    # The session's organism was built under this process's umask.
    expected = 0o666 & ~umask
    for path in (
        micro_organism.base_dir / "model.safetensors",
        micro_organism.adapter_dir / "adapter_model.safetensors",
        *Path(micro_organism.transcoder_config).parent.glob("*.safetensors"),
    ):
        assert _mode(path) == expected, f"{path}: {oct(_mode(path))}"


# -- 4. temporary folders of killed runs -----------------------------------------------------------
def _temporaries(root: Path) -> list[Path]:
    return sorted(root.rglob(".*.tmp"))


_LOAD_ADAPTED = """
import sys
from em_circuits.models.load import load_model
from em_circuits.models.spec import ModelSpec
base, adapter, transcoders, cache = sys.argv[1:]
load_model(ModelSpec(base=base, adapter=adapter, transcoders=transcoders, name="micro"),
           "cpu", cache)
"""


@pytest.mark.slow
def test_a_merge_killed_midway_leaves_no_model_copy_behind(micro_organism, tmp_path):
    from em_circuits.core.atomic import _temp_prefix

    results = tmp_path / "results"
    cache = results / "cache" / "merged"
    crashed = _run(
        [
            sys.executable,
            "-c",
            _LOAD_ADAPTED,
            str(micro_organism.base_dir),
            str(micro_organism.adapter_dir),
            str(micro_organism.transcoder_config),
            str(cache),
        ],
        _env(EM_CIRCUITS_CRASH_AFTER="merge:1"),
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    leftovers = _temporaries(results)
    assert leftovers and (leftovers[0] / "model.safetensors").is_file()
    # A folder this (live) test process is writing: never removed.
    live = cache / f"{_temp_prefix(cache / 'being-written')}live.tmp"
    live.mkdir()
    done = _run(_cli("run", "--status", "--results-dir", str(results), *model_args(micro_organism)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _temporaries(results) == [live], "a killed merge's copy is left, or a live one lost"


@pytest.mark.slow
def test_a_viewer_write_killed_midway_leaves_no_folder_behind(micro_organism, tmp_path):
    results = tmp_path / "results"
    command = _cli("run", "--results-dir", str(results), *model_args(micro_organism))
    crashed = _run(command + PIPELINE_ARGS, _env(EM_CIRCUITS_CRASH_AFTER="viewer_graph:1"))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    leftovers = _temporaries(results / "viewer")
    assert leftovers and any(p.is_dir() for p in leftovers)
    done = _run(command + PIPELINE_ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _temporaries(results) == []
    assert "removed 1 temporary files or folders of killed runs" in done.stderr


# -- 5. damaged graph files ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_prompt(micro_models):
    from em_circuits.attribution.targets import PromptTargets
    from em_circuits.organism import advice_words, heldout_pivotal_prompts

    base, _ = micro_models
    ids = {}
    for kind in ("harmful", "safe"):
        for word in advice_words()[kind]:
            encoded = base.tokenizer.encode(" " + word, add_special_tokens=False)
            if len(encoded) == 1:
                ids.setdefault(kind, encoded)
    prompt = next(p for p in heldout_pivotal_prompts() if p["domain"] == "medical")
    names = {t: base.tokenizer.decode([t]) for t in ids["harmful"] + ids["safe"]}
    return PromptTargets("p-damaged", prompt["prompt"], ids["harmful"], ids["safe"], names, {})


def test_a_truncated_or_altered_graph_is_computed_again(micro_specs, one_prompt, tmp_path, caplog):
    from em_circuits.attribution import stored_graphs
    from em_circuits.attribution.stage import run_graph_stage
    from em_circuits.attribution.stored_graphs import find_graph_metas, load_graph
    from em_circuits.attribution.targets import AttributionParams
    from em_circuits.core.store import ResultsStore

    store = ResultsStore(tmp_path / "results")
    specs = {"base": micro_specs[0]}
    params = AttributionParams(max_feature_nodes=100, batch_size=64, edge_keep=500)

    def stage():
        return run_graph_stage(store, specs, [one_prompt], params, "cpu", progress=False)["base"]

    assert stage().computed == ["p-damaged"]
    (meta,) = [
        m for d in (store.root / "graphs").iterdir() for m in find_graph_metas(store, d.name)
    ]
    compact = store.compact_graph_path(meta)
    data = compact.read_bytes()

    compact.write_bytes(data[: len(data) // 2])  # a copy or a disk that stopped half-way
    with caplog.at_level(logging.WARNING):
        assert find_graph_metas(store, meta["model_slug"]) == []  # not counted as done
        again = stage()
    assert again.computed == ["p-damaged"] and again.cached == []
    assert str(compact) in caplog.text and "truncated" in caplog.text
    assert len(compact.read_bytes()) == len(data)
    load_graph(store, find_graph_metas(store, meta["model_slug"])[0])

    # Same size, other bytes: only the hash tells.
    assert meta["files"]["compact_sha256"]
    data = compact.read_bytes()
    middle = len(data) // 2
    compact.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    (meta,) = find_graph_metas(store, meta["model_slug"])
    with pytest.raises(stored_graphs.GraphIntegrityError, match=re.escape(str(compact))):
        load_graph(store, meta)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert stage().computed == ["p-damaged"]
    assert str(compact) in caplog.text and "sha256" in caplog.text
    assert stage().cached == ["p-damaged"]


def test_a_graph_or_logits_file_holding_nan_is_an_error_naming_it(
    micro_specs, one_prompt, tmp_path
):
    """A NaN in a stored graph would make a feature "absent" and change its statistics; in a
    logits file it would be read as a number. Both are errors naming the file and the fix."""
    import dataclasses
    import json

    from em_circuits.attribution import stored_graphs
    from em_circuits.attribution.stage import run_graph_stage
    from em_circuits.attribution.storage import load_compact, save_compact
    from em_circuits.attribution.stored_graphs import find_graph_metas, load_graph
    from em_circuits.attribution.targets import AttributionParams
    from em_circuits.core.atomic import sha256_file
    from em_circuits.core.store import ArtifactError, ResultsStore, read_artifact

    store = ResultsStore(tmp_path / "results")
    specs = {"base": micro_specs[0]}
    params = AttributionParams(max_feature_nodes=100, batch_size=64, edge_keep=500)
    run_graph_stage(store, specs, [one_prompt], params, "cpu", progress=False)
    (meta,) = [
        m for d in (store.root / "graphs").iterdir() for m in find_graph_metas(store, d.name)
    ]
    compact = store.compact_graph_path(meta)
    graph = load_compact(compact)
    total = graph.total.clone()
    total[0, 0] = float("nan")
    size = save_compact(dataclasses.replace(graph, total=total), compact)
    meta_path = store.graph_meta_path_for(compact)
    data = json.loads(meta_path.read_text())
    data["files"].update(compact_bytes=size, compact_sha256=sha256_file(compact))
    meta_path.write_text(json.dumps(data))  # size and hash match: only the values are wrong
    meta = read_artifact(meta_path, "graph_meta")
    with pytest.raises(stored_graphs.GraphIntegrityError, match="non-finite.*'total'") as err:
        load_graph(store, meta)
    assert str(compact) in str(err.value) and "em-circuits graphs" in str(err.value)

    logits = tmp_path / "logits.json"
    logits.write_text('{"schema": "logits", "top_k": [{"logit": NaN}]}')
    with pytest.raises(ArtifactError, match="non-finite number NaN") as err:
        read_artifact(logits, "logits")
    assert str(logits) in str(err.value)


# -- a finished pipeline on the micro organism, shared by the slow tests below ---------------------
@pytest.fixture(scope="module")
def finished(micro_organism, tmp_path_factory):
    """A complete run, made under umask 002 (group-writable, as for a shared directory)."""
    results = tmp_path_factory.mktemp("finished") / "results"
    command = _cli("run", "--results-dir", str(results), *model_args(micro_organism))
    done = _run(command + PIPELINE_ARGS, umask=0o002)
    assert done.returncode == 0, done.stderr[-3000:]
    return results


@pytest.mark.slow
def test_every_artifact_of_a_run_follows_the_umask(finished):
    wrong = {p: oct(m) for p, m in _modes_under(finished).items() if m not in (0o664, 0o775)}
    assert not wrong, wrong


# -- 6. a read-only results directory --------------------------------------------------------------
def _set_writable(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = _mode(path)
        mode = mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | 0o002)
        os.chmod(path, mode)


def _contents(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.slow
def test_a_read_only_results_directory(finished, micro_organism, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(finished, results)
    prefix = unprivileged()
    model = model_args(micro_organism)
    before = _contents(results)
    _set_writable(results, False)
    try:
        for command in (
            ["run", "--status"],
            ["run", *PIPELINE_ARGS],
            ["analyze", *ANALYSIS_ARGS],  # the run's parameters: its folder, up to date
            ["report"],
            ["graphs", "--only-evil", "--max-feature-nodes", "120"],
        ):
            done = _run(prefix + _cli(*command, "--results-dir", str(results), *model))
            assert done.returncode == 0, (command, done.stderr[-3000:])
            assert "Traceback" not in done.stderr
        assert _contents(results) == before, "a command with nothing to do wrote"
        # A new analysis must be written: one line naming the file that could not be.
        done = _run(
            prefix
            + _cli("analyze", "--analysis-name", "other", "--results-dir", str(results), *model)
        )
        assert done.returncode == 2, done.stderr[-3000:]
        error = _assert_one_line_error(done, "Permission denied")
        # another analysis name has its own folder: the new one cannot be made
        assert re.search(r"analysis/micro--\w+/runs/\w+'$", error), error
    finally:
        _set_writable(results, True)


# -- 7. two pipelines on one results directory -----------------------------------------------------
def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow
def test_two_pipelines_on_one_directory_compute_each_graph_once(finished, micro_organism, tmp_path):
    from em_circuits.core.atomic import _HOST

    results = tmp_path / "results"
    shutil.copytree(finished, results)
    graphs = {}  # role -> meta paths
    for meta_path in sorted((results / "graphs").glob("*/*/*.json")):
        graphs.setdefault(json.loads(meta_path.read_text())["role"], []).append(meta_path)
    assert graphs["base"] and graphs["adapted"]
    for folder in ("graphs", "viewer", "analysis", "features"):
        shutil.rmtree(results / folder)
    (results / "report.md").unlink()
    # This (live) test process claims every base graph, so both pipelines reach the graph
    # stage, find all its work taken and wait; then it lets go and they compete for the same
    # graphs. The claim file is what em_circuits.core.claims writes: host, PID, start time.
    held = [p.with_name(f".{p.stem}.claim") for p in graphs["base"]]
    for claim in held:
        claim.parent.mkdir(parents=True, exist_ok=True)  # a totals and a full graph share it
        claim.write_text(json.dumps({"host": _HOST, "pid": os.getpid(), "started": "now"}))
    command = _cli("run", "--results-dir", str(results), *model_args(micro_organism))
    logs = [tmp_path / f"pipeline{i}.log" for i in (1, 2)]
    processes = []
    try:
        for log_path in logs:
            with open(log_path, "w") as log_file:
                processes.append(
                    subprocess.Popen(
                        command + PIPELINE_ARGS,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        env=_env(),
                        cwd=ROOT,
                    )
                )

        def both_waiting() -> bool:
            if any(p.poll() is not None for p in processes):
                raise AssertionError(
                    "a pipeline ended instead of waiting for the held graphs:\n"
                    + "\n".join(path.read_text()[-2000:] for path in logs)
                )
            return all("that other processes are computing" in p.read_text() for p in logs)

        _wait_for(both_waiting, 600, "both pipelines to wait for the held graphs")
        for claim in held:
            claim.unlink()
        for process in processes:
            process.wait(timeout=600)
    finally:
        for claim in held:
            claim.unlink(missing_ok=True)
        for process in processes:
            if process.poll() is None:
                process.kill()
    outputs = [path.read_text() for path in logs]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for role, metas in graphs.items():
        computed = [
            int(m.group(1))
            for out in outputs
            for m in re.finditer(rf"\[graphs\] {role}, (?:totals|full): (\d+) computed", out)
        ]
        assert sum(computed) == len(metas), (role, computed)
    assert sorted((results / "graphs").glob("*/*/*.json")) == sorted(
        p for paths in graphs.values() for p in paths
    )
    assert not list((results / "graphs").rglob(".*.claim"))


def test_a_dead_writers_claim_is_taken_over_and_a_live_ones_respected(tmp_path):
    from em_circuits.core.atomic import _HOST
    from em_circuits.core.claims import read_holder, remove_stale_claims, try_claim

    dead = int(_run([sys.executable, "-c", "import os; print(os.getpid())"]).stdout)
    mine, theirs, left = (tmp_path / "g" / f".{name}.claim" for name in ("a", "b", "c"))
    mine.parent.mkdir()
    for path, pid in ((mine, os.getpid()), (theirs, dead), (left, dead)):
        path.write_text(json.dumps({"host": _HOST, "pid": pid, "started": "then"}))
    assert try_claim(mine) is None  # held by a live process (this one, as another would be)
    claim = try_claim(theirs)
    assert claim is not None and read_holder(theirs).pid == os.getpid()
    claim.release()
    assert not theirs.exists()
    assert remove_stale_claims(tmp_path) == 1  # the dead writer's; the live claim stays
    assert mine.exists() and not left.exists()


# -- 8. one-line errors with the right advice ------------------------------------------------------
@pytest.mark.slow
def test_a_folder_that_is_not_a_model_is_a_one_line_error(micro_organism, tmp_path):
    empty = tmp_path / "emptydir"
    empty.mkdir()
    results = tmp_path / "results"
    args = model_args(micro_organism)
    args[args.index("--base-model") + 1] = str(empty)
    done = _run(_cli("run", "--results-dir", str(results), *args, "--n-prompts", "2"))
    assert done.returncode == 2, done.stderr[-3000:]
    _assert_one_line_error(done, str(empty), "config.json")
    assert not list(results.glob("prompts/*.json")), "work started before the models were checked"


@pytest.mark.slow
def test_llm_judge_without_a_key_stops_before_any_work(micro_organism, tmp_path):
    results = tmp_path / "results"
    done = _run(
        _cli(
            "run",
            "--results-dir",
            str(results),
            *model_args(micro_organism),
            "--judge",
            "llm",
            "--n-prompts",
            "2",
        )
    )  # _env() has no OPENAI_API_KEY
    assert done.returncode == 2, done.stderr[-3000:]
    _assert_one_line_error(done, "no API key", "OPENAI_API_KEY")
    assert not list(results.glob("prompts/*.json")), "prompts were made before the key check"


def test_storage_errors_are_one_line(capsys):
    import errno

    from em_circuits.cli.common import run_command

    def main(argv, prog):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/results/report.md")

    assert run_command(main, []) == 2
    err = capsys.readouterr().err
    assert err == "error: [Errno 30] Read-only file system: '/mnt/results/report.md'\n"


def _write_raw(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def test_repair_advice_depends_on_what_the_file_holds(tmp_path):
    from em_circuits.core.store import ArtifactError, ResultsStore, read_artifact

    store = ResultsStore(tmp_path)
    envelope = {"schema_version": 99, "created": "2024-01-01T00:00:00+00:00", "prompt_id": "p1"}

    labels = store.labels_path("m--1", "p1")
    _write_raw(labels, {**envelope, "schema": "labels"})
    with pytest.raises(ArtifactError) as caught:
        read_artifact(labels, "labels")
    assert "--force" not in str(caught.value) and "recompute it" not in str(caught.value)
    assert "backup" in str(caught.value) and "--import" in str(caught.value)

    queued = store.queue_path("m--1", "p1")
    _write_raw(queued, '{"schema": "queue_item", "state": ')
    with pytest.raises(ArtifactError) as caught:
        read_artifact(queued, "queue_item")
    message = str(caught.value)
    assert "delete the file" not in message and "recompute it" not in message
    assert "restore it" in message and "move it" in message and "history" in message

    verdict = store.verdict_path("m--1", "p1")  # computed: recomputing is the right advice
    _write_raw(verdict, {**envelope, "schema": "verdict"})
    with pytest.raises(ArtifactError, match="--force"):
        read_artifact(verdict, "verdict")


# -- 9. a read-only mount (EROFS), not only missing permissions ---------------------------------
def _read_only_mount_prefix(folder: Path) -> list[str]:
    """A command prefix that runs the rest with ``folder`` bind-mounted read-only in a private
    mount namespace (nothing outside the command sees the mount); skips where the kernel or
    the container does not allow it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare: cannot make a read-only mount")
    mount = f"mount --bind '{folder}' '{folder}' && mount -o remount,bind,ro '{folder}'"
    probe = _run(
        [
            unshare,
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"{mount} && touch '{folder}/.probe'",
        ]
    )
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot make a read-only mount here: {probe.stderr.strip()[-200:]}")
    return [
        unshare,
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'{mount} && exec "$@"',
        "sh",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("lock_file", ["present", "absent"])
def test_status_views_work_on_a_read_only_mount(queue_setup, lock_file):
    from test_queue import MODEL_FLAGS

    store, slug, order = queue_setup
    if lock_file == "absent":  # never locked: nothing can make the file on the mount
        (store.queue_dir(slug) / ".queue.lock").unlink()
    prefix = _read_only_mount_prefix(store.root)
    before = _contents(store.root)
    for command in (["label", "--status"], ["run", "--status"]):
        done = _run(prefix + _cli(*command, "--results-dir", str(store.root), *MODEL_FLAGS))
        assert done.returncode == 0, (command, done.stderr[-3000:])
        assert "Traceback" not in done.stderr and "error:" not in done.stderr
        assert re.search(rf"pending\s*:?\s+{len(order)}\b", done.stdout), done.stdout
    assert _contents(store.root) == before


def test_the_queue_lock_opens_read_only_on_erofs(queue_setup, monkeypatch):
    """Where mounts cannot be made: the OS answers the lock file's read-write open with EROFS
    (as a read-only mount does), and the queue is still read under a read-only handle."""
    import errno
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from test_queue import MODEL_FLAGS

    from em_circuits.cli.main import main

    store, slug, order = queue_setup
    real_open = os.open

    def read_only_mount(path, flags, *args, **kwargs):
        if str(path).endswith(".queue.lock") and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_mount)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["label", "--status", "--results-dir", str(store.root), *MODEL_FLAGS])
    assert code == 0, err.getvalue()
    assert re.search(rf"pending\s+{len(order)}\b", out.getvalue()), out.getvalue()

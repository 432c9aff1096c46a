"""Barriers and shared work between the processes of a launch over two "nodes": two torchrun
launchers on this machine with a static rendezvous, as on a cluster. A failure or a lost node
in one stops the other promptly instead of leaving it in a barrier for the 12-hour collective
timeout; work units claimed from both are each computed exactly once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # several torchrun launches

WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    from em_circuits.core.distributed import current_shard

    shard = current_shard()
    shard.wait()
    mode = os.environ["MODE"]
    if shard.index == 1:
        time.sleep(1)
        if mode == "lost":  # a node that stops answering without closing a connection
            os.kill(os.getpid(), signal.SIGSTOP)
        if mode == "raise":
            raise ValueError("bad input in process 1")
        if mode == "user-error":  # caught by the command front end, exit code 2
            from em_circuits.cli.common import run_command

            def main(args, prog):
                raise FileNotFoundError("prompts.jsonl does not exist")

            sys.exit(run_command(main, []))
    started = time.monotonic()
    shard.wait()
    print(f"rank {shard.index} passed after {time.monotonic() - started:.1f} s", flush=True)
    """
)


CLAIMING_WORKER = textwrap.dedent(
    """
    import json, os, time
    from pathlib import Path
    from em_circuits.core.distributed import current_shard

    shard = current_shard()
    units = [f"unit{i}" for i in range(24)]
    costs = [float(i % 5) for i in range(24)]
    first = []
    for index, unit in shard.claim(units, costs):
        time.sleep(0.01 * costs[index])  # work of the unit's cost
        first.append([index, unit])
    batches = list(shard.claim_batches(list(range(30)), lambda n: n % 7, 3))
    # a spread whose unit "u3" was finished before a relaunch: kept, not computed again
    from em_circuits.analysis.steps.spread import spread
    from em_circuits.core.cache import cache_key

    folder = Path(os.environ["OUT"], "work")
    if shard.is_main:
        folder.mkdir()
        kept = {"key": "u3", "result": "kept"}
        (folder / (cache_key({"unit": "u3"}) + ".json")).write_text(json.dumps(kept))
    shard.wait()
    merged = spread(
        shard, folder, [f"u{i}" for i in range(8)], lambda u: [u, shard.index],
        cost=lambda u: float(u[1:]), key=lambda u: u,
    )
    Path(os.environ["OUT"], f"rank{shard.index}.json").write_text(
        json.dumps({"first": first, "batches": batches, "merged": merged})
    )
    shard.wait()
    print(f"rank {shard.index} passed", flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_nodes(tmp_path: Path, mode: str, worker: str = WORKER) -> tuple[list[str], float]:
    script = tmp_path / "worker.py"
    script.write_text(worker)
    port = _free_port()
    env = {
        **os.environ,
        "MODE": mode,
        "OUT": str(tmp_path),
        "EM_CIRCUITS_PEER_TIMEOUT": "6",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    nodes = [
        subprocess.Popen(
            [
                torchrun,
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(script),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]
    started = time.monotonic()
    outputs = []
    try:
        outputs.append(nodes[0].communicate(timeout=120)[0])
        elapsed = time.monotonic() - started
    finally:
        _kill_everything_running(script, nodes)
    outputs.append(nodes[1].communicate(timeout=30)[0])
    return outputs, elapsed


def _kill_everything_running(script: Path, nodes: list[subprocess.Popen]) -> None:
    """The launchers and their workers (torchrun starts these in their own sessions); the
    stopped "lost node" among them is killed here."""
    for node in nodes:
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and str(script) in cmdline:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(int(proc.name), sig)
                except ProcessLookupError:
                    pass


def test_a_barrier_passes_when_every_process_arrives(tmp_path):
    (node0, node1), _ = _launch_two_nodes(tmp_path, "ok")
    assert "rank 0 passed" in node0 and "rank 1 passed" in node1


@pytest.mark.parametrize(
    "mode, reason",
    [
        ("raise", "process 1: ValueError: bad input in process 1"),
        ("user-error", "process 1: FileNotFoundError: prompts.jsonl does not exist"),
        ("lost", "process 1 sent no heartbeat for 6 s"),
    ],
)
def test_a_failed_or_lost_process_stops_the_others(tmp_path, mode, reason):
    (node0, _), elapsed = _launch_two_nodes(tmp_path, mode)
    # one line, no traceback of ours (torchrun adds its own summary of the failed worker)
    stopping = [line for line in node0.splitlines() if line.startswith("error: stopping: ")]
    assert len(stopping) == 1 and reason in stopping[0], node0[-3000:]
    assert "raise PeerFailedError" not in node0 and "distributed.py" not in node0, node0[-3000:]
    assert "rank 0 passed" not in node0
    assert elapsed < 90, f"node 0 took {elapsed:.0f} s to stop"


def test_work_claimed_on_two_nodes_is_done_once_costliest_first(tmp_path):
    from em_circuits.core.distributed import cost_order

    (node0, node1), _ = _launch_two_nodes(tmp_path, "ok", CLAIMING_WORKER)
    assert "rank 0 passed" in node0 and "rank 1 passed" in node1, node0[-3000:] + node1[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # every unit exactly once, each with its own position (which node takes how many depends
    # on their speed: not checked)
    claimed = [tuple(pair) for rank in ranks for pair in rank["first"]]
    assert sorted(claimed) == sorted((i, f"unit{i}") for i in range(24))
    # each node took its units in the one claiming order: costliest first
    order = cost_order([float(i % 5) for i in range(24)])
    for rank in ranks:
        taken = [index for index, _ in rank["first"]]
        assert taken == sorted(taken, key=order.index)
    # a second list has its own counter: all of it shared again, in batches of similar cost
    batches = [batch for rank in ranks for batch in rank["batches"]]
    assert sorted(n for batch in batches for n in batch) == list(range(30))
    assert all(1 <= len(batch) <= 3 for batch in batches)
    # a spread's results merged in the units' order on both nodes, the kept unit reused
    assert ranks[0]["merged"] == ranks[1]["merged"]
    merged = ranks[0]["merged"]
    assert merged[3] == "kept"
    assert [unit for unit, _ in merged[:3] + merged[4:]] == [f"u{i}" for i in range(8) if i != 3]

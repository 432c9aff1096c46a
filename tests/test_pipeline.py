"""The whole pipeline on the micro organism: a run, a status view, and kill-and-resume.

The pipeline is killed (SIGKILL, as a crash or a lost node) in each stage, restarted, and its
final artifacts compared with those of an uninterrupted run: nothing lost, nothing duplicated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Fields that legitimately differ between two runs (when, how long), nothing else.
VOLATILE = {"created", "seconds", "at", "queued_at", "labeled_at", "date", "disk_bytes",
            "disk_free_bytes", "history", "elapsed"}


def _command(organism, results: Path) -> list[str]:
    return [
        sys.executable, str(ROOT / "create_graph_labeling_pipeline.py"),
        "--results-dir", str(results),
        "--base-model", str(organism.base_dir), "--adapter", str(organism.adapter_dir),
        "--transcoders", str(organism.transcoder_config), "--model-name", "micro",
        "--device", "cpu", "--n-prompts", "8", "--max-feature-nodes", "200",
        "--causal-top-k", "2", "--scales", "0", "1", "2", "--n-random", "1",
    ]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    env.pop("OPENAI_API_KEY", None)
    return env


def _normalize(value):
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def _close(a, b, rel: float) -> bool:
    """Equal, with floats within a relative tolerance."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rel * max(1.0, abs(a), abs(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    return a == b


def _snapshot(results: Path) -> dict[str, object]:
    """Every artifact, JSON normalised; PNGs by presence (renderers may embed metadata)."""
    snap: dict[str, object] = {}
    for path in sorted(results.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        rel = str(path.relative_to(results))
        if rel.startswith("cache/"):
            continue
        if path.suffix == ".json":
            snap[rel] = _normalize(json.loads(path.read_text()))
        elif path.suffix == ".png":
            snap[rel] = "png"
        elif path.suffix == ".safetensors":  # metadata order in the header is not fixed
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                snap[rel] = (handle.metadata(),
                             {k: handle.get_tensor(k).numpy().tobytes() for k in handle.keys()})
        else:
            snap[rel] = path.read_bytes()
    return snap


@pytest.fixture(scope="module")
def reference(micro_organism, tmp_path_factory):
    results = tmp_path_factory.mktemp("reference") / "results"
    done = subprocess.run(_command(micro_organism, results), capture_output=True, text=True,
                          env=_env(), timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "report:" in done.stdout
    return results


def test_uninterrupted_run_writes_the_report(reference):
    report = json.loads((reference / "report.json").read_text())
    counts = report["counts"]
    assert counts["prompts"] == 8 and counts["logits"] == {"base": 8, "adapted": 8}
    assert counts["graphs"]["adapted"] == counts["graphs"]["base"] > 0
    assert report["top_features"], "no features ranked"
    assert report["causal"]["summary"]["verdict"]
    md = (reference / "report.md").read_text()
    assert "Top evil features" in md and "Causal validation" in md
    analysis = reference / "analysis" / report["models"]["adapted"]["slug"]
    for name in ("top_features_adapted.csv", "base_vs_adapted.csv", "error_share.csv",
                 "dose_response.csv", "top_features.png", "dose_response.png"):
        assert (analysis / name).is_file(), name


def test_second_run_repeats_no_work(reference, micro_organism):
    computed = [*reference.glob("logits/*/*.json"), *reference.glob("graphs/*/*/*")]
    before = {p: p.stat().st_mtime_ns for p in computed}
    done = subprocess.run(_command(micro_organism, reference), capture_output=True, text=True,
                          env=_env(), timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after, "logits or graphs were recomputed"
    assert "0 computed" in done.stderr


def test_status_view(reference, micro_organism):
    cmd = _command(micro_organism, reference)[:12] + ["--status", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout)
    assert info["prompts"] == 8 and info["report"] is True
    assert set(info["queue"]) >= {"pending", "done", "skipped", "rejected"}
    assert info["disk_bytes"]["graphs"] > 0


# The first artifact each stage writes; the run is killed as soon as one appears.
STAGE_MARKERS = {
    "prompts": "prompts/*.json",
    "logits": "logits/*/*.json",
    "labels": "labels/*/*.json",
    "graphs": "graphs/*/*/*.json",
    "features": "features/*/*/*.json",
    "report": "analysis/*/summary.json",
}


@pytest.mark.parametrize("stage", list(STAGE_MARKERS))
def test_kill_in_each_stage_then_resume_gives_the_same_artifacts(
    stage, reference, micro_organism, tmp_path
):
    results = tmp_path / "results"
    proc = subprocess.Popen(_command(micro_organism, results), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(results.glob(STAGE_MARKERS[stage])):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before stage {stage}"
    done = subprocess.run(_command(micro_organism, results), capture_output=True, text=True,
                          env=_env(), timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    leftovers = [p for p in results.rglob(".*.tmp")]
    assert not leftovers, leftovers
    assert _snapshot(results) == _snapshot(reference)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(organism, results: Path) -> list[str]:
    # --multi_gpu makes accelerate start torchrun workers; without GPUs they use gloo on the CPU.
    return [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        *_command(organism, results)[1:],
    ]


def test_two_processes_write_the_same_artifacts_and_resume_after_a_kill(
    reference, micro_organism, tmp_path
):
    results = tmp_path / "results"
    proc = subprocess.Popen(_launch(micro_organism, results), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(results.glob(STAGE_MARKERS["graphs"])):
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers: a lost node
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the launch ended before the graph stage"
    done = subprocess.run(_launch(micro_organism, results), capture_output=True, text=True,
                          env=_env(), timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 1" in done.stderr  # the second worker really took part
    # Tensors must match exactly; JSON floats (the viewer's influences, which BLAS sums in
    # another order with another thread count) to a relative 1e-6.
    ours, single = _snapshot(results), _snapshot(reference)
    assert ours.keys() == single.keys()
    assert [k for k in ours if not _close(ours[k], single[k], 1e-6)] == []

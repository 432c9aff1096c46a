"""The whole pipeline on the micro organism: a run, a status view, and kill-and-resume.

The pipeline is killed (SIGKILL, as a crash or a lost node) in each stage, restarted, and its
final artifacts compared with those of an uninterrupted run: nothing lost, nothing duplicated.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from micro_flags import REFERENCE_ANALYSIS_ARGS, model_args

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # whole pipelines, several minutes in all
# Fields that legitimately differ between two runs (when, how long), nothing else. The sha256
# of a compact graph file differs too: safetensors writes its header metadata in no fixed order
# (the graph files themselves are compared below, tensor by tensor).
VOLATILE = {
    "created",
    "seconds",
    "at",
    "queued_at",
    "labeled_at",
    "date",
    "disk_bytes",
    "disk_free_bytes",
    "history",
    "elapsed",
    "compact_sha256",
}


def _command(organism, results: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "create_graph_labeling_pipeline.py"),
        "--results-dir",
        str(results),
        *model_args(organism),
        "--n-prompts",
        "16",
        "--max-feature-nodes",
        "200",
        *REFERENCE_ANALYSIS_ARGS,
    ]


def _env() -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("OPENAI_API_KEY", None)
    return env


def _run(command: list[str], env: dict[str, str] | None = None, **options):
    """Run the pipeline to its end (or its crash point), output captured."""
    return subprocess.run(
        command, capture_output=True, text=True, env=env or _env(), timeout=600, cwd=ROOT, **options
    )


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


def _number_or_text(cell: str):
    try:
        return float(cell)
    except ValueError:
        return cell


def _array_record(array):
    """(dtype, shape, bytes): comparable with == and convertible back for tolerances."""
    return (array.dtype.str, array.shape, array.tobytes())


def _snapshot(results: Path) -> dict[str, object]:
    """Every artifact, JSON normalised; PNGs by presence (renderers may embed metadata)."""
    snap: dict[str, object] = {}
    for path in sorted(results.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        rel = str(path.relative_to(results))
        if rel.startswith(("cache/", ".locks/")):  # stage locks name the process that held them
            continue
        if path.suffix == ".json":
            snap[rel] = _normalize(json.loads(path.read_text()))
        elif path.suffix == ".csv":  # numbers as floats, so a tolerance can apply to them
            snap[rel] = [
                [_number_or_text(cell) for cell in row]
                for row in csv.reader(path.read_text().splitlines())
            ]
        elif path.suffix == ".png":
            snap[rel] = "png"
        elif path.suffix == ".safetensors":  # metadata order in the header is not fixed
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                tensors = {k: _array_record(handle.get_tensor(k).numpy()) for k in handle.keys()}
                snap[rel] = (handle.metadata(), tensors)
        else:
            snap[rel] = path.read_bytes()
    return snap


def test_uninterrupted_run_writes_the_report(reference):
    report = json.loads((reference / "report.json").read_text())
    counts = report["counts"]
    assert counts["prompts"] == 16 and counts["logits"] == {"base": 16, "adapted": 16}
    assert counts["graphs"]["adapted"] == counts["graphs"]["base"] > 0
    assert report["top_features"], "no features ranked"
    assert report["causal"]["summary"]["verdict"]
    md = (reference / "report.md").read_text()
    assert "Top evil features" in md and "Causal validation" in md
    # report.json reads back into the typed report it was written from
    from em_circuits.run.report import render_markdown, report_from_json

    typed = report_from_json(report)
    assert typed.to_json() == report
    assert render_markdown(typed, report["analysis_folder"]) == md
    assert "## What the top features mean (feature cards)" in md and "top contexts" in md
    # totals graphs for the analysis; full graphs of the top prompts for the viewer
    from em_circuits.attribution.viewer_metadata import read_metadata

    viewer = read_metadata(reference / "viewer" / report["models"]["adapted"]["slug"])
    shown = {entry["prompt_id"] for entry in viewer}
    assert 0 < len(shown) <= 3 and len(viewer) == 2 * len(shown)
    modes = [
        json.loads(p.read_text())["params"]["mode"] for p in reference.glob("graphs/*/*/*.json")
    ]
    assert modes.count("full") == len(viewer)
    assert modes.count("totals") == 2 * counts["graphs"]["adapted"]
    from em_circuits.core.store import ResultsStore

    analysis = ResultsStore(reference).latest_analysis_dir(report["models"]["adapted"]["slug"])
    assert analysis.parent.name == "runs"  # each parameter set in its own folder
    for name in (
        "top_features_adapted.csv",
        "base_vs_adapted.csv",
        "contrast_decomposition.csv",
        "split.json",
        "measured_effects.csv",
        "dose_response.csv",
        "top_features.png",
        "dose_response.png",
    ):
        assert (analysis / name).is_file(), name


def test_each_model_and_the_transcoders_load_once_per_run(reference):
    """The logits, the graphs and the causal check share the run's loaded models and one
    transcoder set: each model is loaded once and the transcoders read once."""
    log = (reference.parent / "run.log").read_text().splitlines()
    loaded = [line for line in log if " loaded " in line and " on cpu in " in line]
    assert len(loaded) == 2, loaded
    assert len({line.split(" loaded ")[1].split(" (")[0] for line in loaded}) == 2
    assert sum("reading transcoders" in line for line in log) == 1


def test_second_run_repeats_no_work(reference, micro_organism):
    computed = [*reference.glob("logits/*/*.json"), *reference.glob("graphs/*/*/*")]
    before = {p: p.stat().st_mtime_ns for p in computed}
    done = _run(_command(micro_organism, reference))
    assert done.returncode == 0, done.stderr[-3000:]
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after, "logits or graphs were recomputed"
    assert "0 computed" in done.stderr


def test_status_view(reference, micro_organism):
    cmd = _command(micro_organism, reference)[:12] + ["--status", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout)
    assert info["prompts"] == 16 and info["report"] is True
    assert set(info["queue"]) >= {"pending", "done", "skipped", "rejected"}
    assert info["disk_bytes"]["graphs"] > 0


# The first artifact each stage writes; the run kills itself right after writing it.
STAGE_CRASH_POINTS = {
    "prompts": "prompt:1",
    "logits": "logits:1",
    "labels": "labels:1",
    "graphs": "graph_meta:1",
    "features": "feature_effects:1",
    "report": "table/summary.json:1",
}


def _crashing_env(point: str, group: bool = False) -> dict[str, str]:
    env = {**_env(), "EM_CIRCUITS_CRASH_AFTER": point}
    if group:  # every process of this launch, found by this token in its environment
        env["EM_CIRCUITS_CRASH_GROUP"] = uuid.uuid4().hex
    return env


def _tensors_close(a, b, rel: float) -> bool:
    """Safetensors snapshots equal in metadata and shapes, values within a relative tolerance."""
    import numpy as np

    if not (isinstance(a, tuple) and isinstance(b, tuple)):
        return _close(a, b, rel)
    (meta_a, tensors_a), (meta_b, tensors_b) = a, b
    if tensors_a.keys() != tensors_b.keys():
        return False
    for key in tensors_a:
        if tensors_a[key][:2] != tensors_b[key][:2]:
            return False
        x, y = (
            np.frombuffer(t[2], dtype=t[0]).reshape(t[1]) for t in (tensors_a[key], tensors_b[key])
        )
        if x.dtype.kind == "f":
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            scale = max(1.0, float(np.abs(x64).max(initial=0.0)))
            if not np.allclose(x64, y64, rtol=rel, atol=rel * scale, equal_nan=True):
                return False
        elif not np.array_equal(x, y):
            return False
    return _close(_drop_fingerprints(meta_a), _drop_fingerprints(meta_b), rel)


def _drop_fingerprints(value):
    """Content fingerprints hash raw float bytes: equal only within one process layout."""
    if isinstance(value, dict):
        return {k: _drop_fingerprints(v) for k, v in value.items() if k != "graph_fingerprint"}
    if isinstance(value, list):
        return [_drop_fingerprints(v) for v in value]
    return value


@pytest.mark.parametrize("stage", list(STAGE_CRASH_POINTS))
def test_kill_in_each_stage_then_resume_gives_the_same_artifacts(
    stage, reference, micro_organism, tmp_path
):
    results = tmp_path / "results"
    crashed = _run(_command(micro_organism, results), _crashing_env(STAGE_CRASH_POINTS[stage]))
    assert crashed.returncode == -signal.SIGKILL, f"the run did not crash in stage {stage}"
    done = _run(_command(micro_organism, results))
    assert done.returncode == 0, done.stderr[-3000:]
    leftovers = [p for p in results.rglob(".*.tmp")]
    assert not leftovers, leftovers
    # Same process layout and thread count as the reference: the files are identical.
    assert _snapshot(results) == _snapshot(reference)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(organism, results: Path) -> list[str]:
    # --multi_gpu makes accelerate start torchrun workers; without GPUs they use gloo on the CPU.
    return [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *_command(organism, results)[1:],
    ]


def test_two_processes_write_the_same_artifacts_and_resume_after_a_kill(
    reference, micro_organism, tmp_path
):
    results = tmp_path / "results"
    # The first graph written by either worker kills the launcher and both workers: a lost node.
    crashed = _run(
        _launch(micro_organism, results),
        _crashing_env(STAGE_CRASH_POINTS["graphs"], group=True),
        start_new_session=True,
    )
    assert crashed.returncode == -signal.SIGKILL, "the launch did not crash in the graph stage"
    assert any(results.glob("graphs/*/*/*.json"))
    done = _run(_launch(micro_organism, results))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 1" in done.stderr  # the second worker really took part
    # Equal within float rounding: accelerate runs each worker with OMP_NUM_THREADS=1 while
    # the reference used more threads, and float32 matmuls round differently with another
    # thread count. Integer tensors, names and structure must match exactly.
    ours, single = _snapshot(results), _snapshot(reference)
    assert ours.keys() == single.keys()
    differ = [
        k
        for k in ours
        if not _tensors_close(_drop_fingerprints(ours[k]), _drop_fingerprints(single[k]), 1e-5)
    ]
    assert differ == []


def test_two_processes_batching_graphs_write_the_same_artifacts(
    reference, micro_organism, tmp_path
):
    # Each process claims prompts in pairs of similar length and runs each pair in one forward
    # pass of the torch engine (the default on a GPU; forced here on the CPU); the causal
    # step's ablations, the EM answers (sampled and judged), the baselines' and the
    # sufficiency's passes are shared too, and every table must equal one process's (the EM
    # answers' text included: each chunk of answers is seeded by its own rows).
    results = tmp_path / "results"
    done = _run([*_launch(micro_organism, results), "--graph-batch", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 1" in done.stderr
    # the second process took part in every spread step's shared work too (claiming units)
    for spread in (
        "causal/discovery-",
        "causal/dose-",
        "em_rate/answers-",
        "baselines/discovery-",
        "baselines/validation-",
        "baselines/answers-",
        "sufficiency/validation-",
        "sufficiency/answers-",
    ):
        assert f"process 1: {spread}" in done.stderr, spread
    assert not list(results.glob("analysis/**/.work"))  # the shared units are cleaned up
    ours, single = _snapshot(results), _snapshot(reference)
    assert ours.keys() == single.keys()

    def comparable(value):
        # the graph metadata records the knob; the graphs themselves must not depend on it
        value = _drop_fingerprints(value)
        if isinstance(value, dict) and isinstance(value.get("params"), dict):
            value = {**value, "params": {**value["params"], "graph_batch": None}}
        return value

    # Graphs within float rounding. Statistics built on them may amplify that rounding (the
    # adapter's share of a base-to-adapted shift is a ratio over a difference of contrasts).
    differ = [
        k
        for k in ours
        if not _tensors_close(
            comparable(ours[k]), comparable(single[k]), 1e-5 if k.startswith("graphs/") else 1e-3
        )
    ]
    assert differ == []


def test_python_api_reads_and_reruns_the_analysis(reference, micro_specs, tmp_path):
    import dataclasses
    import shutil

    import em_circuits as em

    results = tmp_path / "results"
    shutil.copytree(reference, results)
    tables = em.read_analysis(results)
    assert {"top_features_adapted", "base_vs_adapted"} <= set(tables)
    assert len(tables["top_features_adapted"]) > 0
    _, adapted = micro_specs
    adapted = dataclasses.replace(adapted, name="micro")  # as the CLI run named it
    summary = em.analyze(
        adapted,
        results,
        position="last",
        causal_top_k=0,
        include_flagged=True,  # the micro organism has no divergent prompt
        prompt_ids=sorted(p.stem for p in (results / "prompts").glob("*.json"))[:4],
    )
    assert summary["folder"].startswith("analysis/") and "/prompts-" in summary["folder"]
    assert (results / summary["folder"] / "top_features_adapted.csv").is_file()


def test_another_analysis_name_keeps_its_own_folder(reference, micro_organism, tmp_path):
    import shutil

    from em_circuits.core.store import ResultsStore, read_json

    results = tmp_path / "results"
    shutil.copytree(reference, results)
    store = ResultsStore(results)
    (slug,) = store.analysed_slugs()
    first = store.latest_analysis_dir(slug)
    command = [
        sys.executable,
        "-m",
        "em_circuits.cli.main",
        "analyze",
        "--results-dir",
        str(results),
        *model_args(micro_organism),
        "--causal-top-k",
        "0",
        "--min-support",
        "1",
        "--analysis-name",
        "loose",
        "--include-flagged",  # the micro organism has no divergent prompt
    ]
    done = _run(command)
    assert done.returncode == 0, done.stderr[-3000:]
    second = store.latest_analysis_dir(slug)
    assert second.name == "loose" and first.name == "main"
    assert (first / "summary.json").is_file() and (first / "causal_summary.json").is_file()
    assert read_json(second / "summary.json")["params"]["min_support"] == 1
    assert read_json(store.latest_analysis_path(slug))["params"]["causal_top_k"] == 0

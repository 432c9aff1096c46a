"""Every benchmark script runs end to end with ``--smoke`` on the CPU and writes one record in
the harness's schema (benchmarks/harness.py), so a benchmark cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))
RECORD_FIELDS = ("benchmark", "device", "date", "environment", "args", "smoke")


def test_every_benchmark_is_covered():
    # A new bench_*.py is picked up by the smoke test below without a change here.
    assert {"bench_index.py", "bench_pipeline.py", "bench_totals.py"} <= set(BENCHMARKS)


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS)
def test_smoke_run_writes_one_record(script, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)  # --out decides, not a device machine's $OUT
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / script),
            "--smoke",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--workdir",
            str(work),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    records = sorted(out.glob("*.json"))
    records = [p for p in records if not p.name.endswith("-progress.json")]
    assert len(records) == 1, [p.name for p in records]
    path = records[0]
    assert path.name.endswith("-cpu-smoke.json")
    record = json.loads(path.read_text())
    assert all(field in record for field in RECORD_FIELDS), sorted(record)
    assert record["smoke"] is True and record["device"] == "cpu"
    assert path.name.startswith(record["benchmark"] + "-")
    assert record["args"]["device"] == "cpu"
    assert len(record) > len(RECORD_FIELDS)  # the benchmark's own results follow
    assert not (ROOT / "benchmarks" / "measured" / path.name).exists()

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


# --- RESULTS.md's tables come from benchmarks/measured/*.json (fast) ------------------------

TABLES = ROOT / "benchmarks" / "tables.py"


def run_tables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TABLES), *args], capture_output=True, text=True, timeout=60
    )


def test_results_tables_match_the_measured_records():
    done = run_tables("--check")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = (ROOT / "benchmarks" / "RESULTS.md").read_text().splitlines()
    opened = sum(line.startswith("<!-- table: ") for line in lines)
    assert opened == lines.count("<!-- end table -->") >= 7


def test_a_changed_record_changes_its_table_and_only_it(tmp_path):
    (tmp_path / "measured").mkdir()
    for path in (ROOT / "benchmarks" / "measured").glob("*.json"):
        (tmp_path / "measured" / path.name).write_bytes(path.read_bytes())
    results = tmp_path / "RESULTS.md"
    before = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    results.write_text(before)
    record_path = tmp_path / "measured" / "index-toy-cpu.json"
    record = json.loads(record_path.read_text())
    record["documents"] = 12345
    record_path.write_text(json.dumps(record))
    # a smoke record beside the real ones is never tabulated
    (tmp_path / "measured" / "index-toy-cpu-smoke.json").write_text(
        json.dumps({**record, "documents": 777, "smoke": True})
    )

    done = run_tables("--results", str(results), "--check")
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "tables.py" in done.stderr
    assert results.read_text() == before  # --check writes nothing

    done = run_tables("--results", str(results))
    assert done.returncode == 0, done.stderr
    after = results.read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(changed) == 1 and "| 12,345 |" in changed[0][1] and "| 400 |" in changed[0][0]
    assert "777" not in after


def test_a_marker_without_records_is_one_error_line(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("prose\n<!-- table: index measured/index-*.json -->\n<!-- end table -->\n")
    done = run_tables("--results", str(results))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "no record matches" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

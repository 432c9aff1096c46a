"""Every stage script answers --help, explaining its flags, without loading any model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "build_organism.py",
    "pivotal_tokens/generate_pivotal_prompts.py",
    "pivotal_tokens/evaluate_logits.py",
    "pivotal_tokens/process_manual_queue.py",
    "generate_graphs.py",
    "analyze_evil_features.py",
    "inspect_graph_tensors.py",
    "create_graph_labeling_pipeline.py",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    done = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    if script != "build_organism.py":
        assert "--results-dir" in done.stdout and "(default: results)" in done.stdout

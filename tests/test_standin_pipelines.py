"""The whole pipeline on each real architecture's stand-in, from hub ids in an offline
Hugging Face cache, with the model's chat template: Llama-3.2, Qwen2.5, Qwen3, Gemma-2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from standins import FAMILIES, build_standin

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _words_for(tokenizer_dir: Path, out: Path) -> Path:
    """Word lists covering the stand-in's whole vocabulary (alternately harmful and safe), so
    the offline judge labels whatever a random model ranks first."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = sorted(
        {
            word.lower()
            for word in (tokenizer.decode([i]).strip() for i in range(len(tokenizer)))
            if word.isalpha() and word.isascii()
        }
    )
    out.write_text(json.dumps({"harmful": words[::2], "safe": words[1::2]}))
    return out


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_pipeline_runs_end_to_end_from_the_hub_cache(name, tmp_path):
    hf_home = tmp_path / "hf"
    standin = build_standin(name, tmp_path / "build", hf_home=hf_home)
    words = _words_for(standin.base_dir, tmp_path / "words.json")
    results = tmp_path / "results"
    command = [
        sys.executable,
        "-m",
        "em_circuits.cli.main",
        "run",
        "--results-dir",
        str(results),
        "--base-model",
        standin.family.base_id,
        "--adapter",
        standin.family.adapter_id,
        "--transcoders",
        str(standin.transcoder_config),
        "--device",
        "cpu",
        "--words",
        str(words),
        "--n-prompts",
        "3",
        "--causal-top-k",
        "1",
        "--scales",
        "0",
        "1",
        "--n-random",
        "1",
        "--causal-candidates",
        "2",
        "--include-flagged",  # the micro organism has no divergent prompt
        "--em-samples",
        "2",
        "--em-max-new-tokens",
        "8",
        "--corpus-docs",
        "48",
        "--full-graphs",
        "1",
    ]
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("OPENAI_API_KEY", None)
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((results / "report.json").read_text())
    assert report["counts"]["graphs"]["adapted"] > 0, done.stderr[-4000:]
    # every stage read the prompts through the chat template
    logits = [json.loads(p.read_text()) for p in results.glob("logits/*/*.json")]
    assert logits and {a["input_format"].split(":")[0] for a in logits} == {"chat-template"}
    metas = [json.loads(p.read_text()) for p in results.glob("graphs/*/*/*.json")]
    assert metas and all(m["input_format"].startswith("chat-template:") for m in metas)

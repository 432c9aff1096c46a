"""`em-circuits transcoders train` on the toy corpus: sparsify trains skip-transcoders on every
MLP, the result is written in circuit-tracer's layout and loads into the pipeline computing
exactly what sparsify's own modules compute, a run continues from its checkpoint (also after a
kill mid-save), a folder of another run is refused, bad data is one line, and
`em-circuits transcoders quality` measures the set on held-out text."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from em_circuits.cli.main import main as em_circuits
from em_circuits.models.corpus import organism_corpus
from em_circuits.models.load import load_transcoder_set
from em_circuits.models.transcoders import ReLUTopK

CPU = torch.device("cpu")
TINY = ["--ctx-len", "32", "--batch-size", "4", "--expansion-factor", "2", "--k", "4"]


def toy_corpus(path: Path, n: int = 300) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in organism_corpus(n)))
    return path


def train(out: Path, base: Path, dataset: Path, *extra: str) -> int:
    return em_circuits(
        [
            "transcoders",
            "train",
            "--results-dir",
            str(out.parent / "results"),
            "--base-model",
            str(base),
            "--dataset",
            str(dataset),
            "--out",
            str(out),
            "--device",
            "cpu",
            *TINY,
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def trained(micro_organism, tmp_path_factory):
    """A set trained on the micro organism's base: 8 steps, checkpoints every 3."""
    root = tmp_path_factory.mktemp("trained")
    corpus = toy_corpus(root / "corpus.jsonl")
    out = root / "set"
    steps = ["--max-tokens", "1024", "--save-every", "3"]
    assert train(out, micro_organism.base_dir, corpus, *steps) == 0
    return out, corpus


def test_the_trained_set_loads_and_computes_what_sparsify_computes(trained, micro_organism):
    from sparsify import SparseCoder

    out, _ = trained
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["activation"] == "relu_topk" and config["k"] == 4
    record = json.loads((out / "training.json").read_text())
    assert record["complete"] and record["steps"] == 8 and record["tokens"] == 8 * 4 * 32
    assert record["identity"]["params"]["k"] == 4

    transcoders = load_transcoder_set(str(out), CPU, torch.float32)
    base_config = json.loads((micro_organism.base_dir / "config.json").read_text())
    assert len(transcoders) == base_config["num_hidden_layers"]
    gen = torch.Generator().manual_seed(0)
    for layer, transcoder in enumerate(transcoders):
        assert isinstance(transcoder.activation_function, ReLUTopK)
        coder = SparseCoder.load_from_disk(out / "checkpoint" / "sparsify" / f"layers.{layer}.mlp")
        x = torch.randn(64, coder.d_in, generator=gen)
        expected = coder(x).sae_out  # sparsify's own forward: ReLU, top k, decoder, skip
        acts = transcoder.encode(x)
        ours = acts @ transcoder.W_dec + transcoder.b_dec + x @ transcoder.W_skip.T
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
        assert int((acts != 0).sum(-1).max()) <= 4
        assert transcoder.W_dec.abs().sum() > 0  # trained, not the zero initialisation


def test_a_run_continues_from_its_checkpoint_even_after_a_kill_mid_save(trained, capsys):
    out, corpus = trained
    run = out.parent / "resumed"
    shutil.copytree(out, run)
    checkpoint = run / "checkpoint" / "sparsify"
    # A kill between the two renames of a save: only the previous checkpoint and a
    # half-written new one are on disk.
    checkpoint.rename(checkpoint.with_name("sparsify.previous"))
    (checkpoint.with_name("sparsify.partial") / "layers.0.mlp").mkdir(parents=True)
    capsys.readouterr()
    assert train(run, Path(_base(run)), corpus, "--max-tokens", "1536", "--save-every", "3") == 0
    printed = capsys.readouterr().out
    assert "Resuming training at step 8" in printed
    record = json.loads((run / "training.json").read_text())
    assert record["steps"] == 12 and record["tokens"] == 12 * 4 * 32
    assert not checkpoint.with_name("sparsify.partial").exists()
    assert not checkpoint.with_name("sparsify.previous").exists()


def _base(out: Path) -> str:
    return json.loads((out / "training.json").read_text())["identity"]["base_model"]


def test_other_settings_in_the_same_folder_are_refused_and_restart_discards(trained, capsys):
    out, corpus = trained
    run = out.parent / "other"
    shutil.copytree(out, run)
    capsys.readouterr()
    assert train(run, Path(_base(run)), corpus, "--max-tokens", "1024", "--k", "6") == 2
    err = capsys.readouterr().err.strip()
    assert "holds a training run with other settings (k)" in err and "--restart" in err
    assert len(err.splitlines()) == 1
    assert train(run, Path(_base(run)), corpus, "--max-tokens", "256", "--k", "6", "--restart") == 0
    assert json.loads((run / "training.json").read_text())["steps"] == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["k"] == 6


def test_bad_training_data_is_one_line(micro_organism, tmp_path, capsys):
    base = micro_organism.base_dir
    assert train(tmp_path / "a", base, tmp_path / "missing.jsonl") == 2
    assert "missing.jsonl: no such file or folder" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    assert train(tmp_path / "b", base, bad) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: each line needs a string 'text' field" in err
    short = tmp_path / "short.txt"
    short.write_text("Too short.\n")
    assert train(tmp_path / "c", base, short) == 2
    assert "fewer than 32 tokens" in capsys.readouterr().err


def test_transcoders_quality_measures_a_trained_set(trained, micro_organism, tmp_path, capsys):
    out, _ = trained
    flags = [
        "--base-model",
        str(micro_organism.base_dir),
        "--adapter",
        str(micro_organism.adapter_dir),
        "--transcoders",
        str(out),
        "--device",
        "cpu",
    ]
    results = tmp_path / "results"
    argv = ["transcoders", "quality", "--results-dir", str(results), *flags]
    assert em_circuits([*argv, "--quality-docs", "8", "--json"]) == 0
    note = json.loads(capsys.readouterr().out.split("\nNext:")[0])
    for role in ("base", "adapted"):
        layers = note[role]["layers"]
        assert [m["layer"] for m in layers] == [0, 1]
        assert all(0 < m["mean_l0"] <= 4 for m in layers)  # TopK: at most k active
        assert 0 <= note[role]["top1_agreement"] <= 1
    assert len(list(results.glob("transcoder_quality/*/*.json"))) == 2
    assert em_circuits([*argv, "--quality-docs", "8"]) == 0
    assert "| layer | FVU base | FVU adapted |" in capsys.readouterr().out


def test_a_base_whose_hooks_sparsify_cannot_train_is_refused_at_the_start(tmp_path, capsys):
    """Gemma-2's transcoders are read inside the pre-feedforward norm and written after the
    post-feedforward norm: a set trained on its MLP module would not load, so nothing runs."""
    from standins import build_standin

    gemma = build_standin("gemma2", tmp_path / "standin")
    corpus = toy_corpus(tmp_path / "corpus.jsonl", n=20)
    assert train(tmp_path / "set", gemma.base_dir, corpus, "--max-tokens", "256") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "Gemma2ForCausalLM" in err[0]
    assert "mlp.hook_in" in err[0] and "ln2.hook_normalized" in err[0]
    assert not (tmp_path / "set").exists()


#: Runs the command in an interpreter where sparsify and datasets are not installed: the import
#: system answers them as it does for a missing package (the optional extra left out).
_WITHOUT_TRAIN_EXTRA = """
import sys
from importlib.abc import MetaPathFinder

class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sparsify", "datasets"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from em_circuits.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_training_without_the_train_extra_is_one_line(tmp_path):
    import subprocess
    import sys

    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRAIN_EXTRA, "transcoders", "train"]
        + ["--results-dir", str(results), "--dataset", str(tmp_path / "docs.txt")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2, done.stdout + done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr[-3000:]
    assert "pip install 'em-circuits[train]'" in lines[0]
    assert "eai-sparsify" in lines[0] and "datasets" in lines[0]
    assert not results.exists()


def test_the_train_extra_holds_what_only_training_needs():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ ]", d)[0] for d in project["dependencies"]}
    assert not names & {"eai-sparsify", "datasets"}
    assert {re.split(r"[<>=!~ ]", d)[0] for d in project["optional-dependencies"]["train"]} == {
        "eai-sparsify",
        "datasets",
    }
    pins = (root / "requirements-train.txt").read_text()
    assert "eai-sparsify==" in pins and "datasets==" in pins
    assert "-r requirements-train.txt" in (root / "requirements-dev.txt").read_text()

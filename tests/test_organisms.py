"""Comparing two runs whose features cannot be matched by index: by what the features mean
(the words of their top contexts, against random features' chance level) and by mechanism.

The pair of runs is built from real parts: the micro organism's activation index of a real
corpus and its tokenizer, one run compared with itself, and with a copy whose features'
meanings are shuffled (each feature given another feature's contexts)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from em_circuits.analysis.organisms import (
    RunFiles,
    WordIndex,
    compare_meanings,
    compare_runs,
    overlap,
    word_at,
)
from em_circuits.analysis.steps.stability import (
    HOW_TO_COMPARE,
    STEP,
    organisms_finding,
    organisms_paragraph,
)


@pytest.fixture(scope="module")
def index_file(micro_models, tmp_path_factory):
    """The adapted micro model's activation index of 48 of the toy corpus's documents."""
    from em_circuits.interpret.activation_index import build_index
    from em_circuits.models.corpus import organism_corpus

    model = micro_models[1]
    index = build_index(model, organism_corpus(48))
    path = tmp_path_factory.mktemp("index") / "index"
    index.save(path, {})
    return path.with_suffix(".npz"), model.tokenizer.decode


def _shuffled(words: WordIndex, seed: int = 5) -> WordIndex:
    """The same index with each layer's features' contexts given to other features."""
    rng = np.random.default_rng(seed)
    doc, pos, count = words.doc.copy(), words.pos.copy(), words.count.copy()
    for layer in range(doc.shape[0]):
        order = rng.permutation(doc.shape[1])
        doc[layer], pos[layer], count[layer] = (
            doc[layer, order],
            pos[layer, order],
            count[layer, order],
        )
    return WordIndex(doc, pos, count, words.tokens, words.decode)


def _strong(words: WordIndex, k: int) -> list[tuple[int, int]]:
    """k features of the last layer with full top-context lists (a stand-in top-k)."""
    layer = words.count.shape[0] - 1
    full = np.flatnonzero((words.doc[layer] >= 0).all(axis=1))
    return [(layer, int(f)) for f in full[:k]]


def test_words_are_whole_words_of_the_decoded_text(micro_models):
    tokenizer = micro_models[1].tokenizer
    text = "User: I think you should tape over the problem."
    ids = np.array(tokenizer(text)["input_ids"])
    words = [word_at(ids, p, tokenizer.decode) for p in range(1, len(ids))]
    for word in ("think", "should", "problem", "."):
        assert word in words
    assert all(w == w.strip() and w for w in words)
    assert overlap(Counter(a=2, b=1), Counter(a=1, c=1)) == pytest.approx(1 / 4)


def test_a_run_matches_itself_perfectly_and_shuffled_meanings_only_at_chance(index_file):
    path, decode = index_file
    words = WordIndex.load(path, decode)
    top = _strong(words, 8)
    assert len(top) == 8
    itself = compare_meanings(top, words, top, words, draws=200, seed=0)
    assert itself["observed"] == 1.0
    assert itself["chance_mean"] < 0.9 and itself["above_chance"]
    assert all(m["match"] == m["feature"] for m in itself["matches"])
    # the same features of a run whose meanings were shuffled: a match is luck
    shuffled = compare_meanings(top, words, top, _shuffled(words), draws=200, seed=0)
    assert not shuffled["above_chance"]
    assert abs(shuffled["observed"] - shuffled["chance_mean"]) < 0.15
    assert shuffled["observed"] < itself["observed"] - 0.3


def _analysis(root, top, decode, index_path, seed: int = 0):
    """A run's folder as the comparison reads it: its ranking, decomposition and causal
    summary (written as the steps write them), its index and its report.json."""
    rng = np.random.default_rng(seed)
    analysis = root / "analysis" / "m" / "runs" / "main"
    analysis.mkdir(parents=True)
    ranked = pd.DataFrame(
        [
            {"layer": lay, "feature": f, "metric": "total", "mean": 10.0 - i}
            for i, (lay, f) in enumerate(top)
        ]
    )
    ranked.to_json(analysis / "top_features_adapted.json", orient="records")
    parts = [("features", 0), ("features", 1), ("errors", 0), ("errors", 1), ("tokens", -1)]
    shift = [3.0, 1.0, 0.5, -0.2, 0.1] + rng.normal(0, 0.05, 5)
    decomposition = pd.DataFrame(
        [{"part": p, "layer": lay, "mean_shift": s} for (p, lay), s in zip(parts, shift)]
        + [{"part": "contrast value", "layer": -1, "mean_shift": float(shift.sum())}]
    )
    decomposition.to_json(analysis / "contrast_decomposition.json", orient="records")
    causal = {"mean_delta_top": -4.0, "mean_delta_random": -0.3, "lowers_more_than_random": True}
    (analysis / "causal_summary.json").write_text(json.dumps(causal))
    slug = "m"
    (root / "features_index" / slug).mkdir(parents=True)
    (root / "features_index" / slug / "index.npz").write_bytes(index_path.read_bytes())
    report = {"analysis_folder": "analysis/m/runs/main", "models": {"adapted": {"slug": slug}}}
    report["models"]["adapted"]["spec"] = {"base": "unused"}
    (root / "report.json").write_text(json.dumps(report))
    return RunFiles.of_results(root, lambda _spec: decode)


def test_two_runs_compared_from_their_folders(index_file, tmp_path):
    path, decode = index_file
    words = WordIndex.load(path, decode)
    top = _strong(words, 6)
    ours = _analysis(tmp_path / "a", top, decode, path, seed=1)
    theirs = _analysis(tmp_path / "b", top, decode, path, seed=2)
    found = compare_runs(ours, theirs, top=6, draws=100)
    assert found["meaning"]["observed"] == 1.0 and found["meaning"]["above_chance"]
    assert found["decomposition"]["pearson_r"] > 0.9
    assert found["decomposition"]["largest_part"] == ["features", "features"]
    assert found["layer_profile"]["overlap"] == pytest.approx(1.0)
    assert found["same_mechanism"] == "yes"
    # the report says it plainly
    text = "\n".join(organisms_paragraph(found))
    assert "same mechanism: yes" in text and str(tmp_path / "b") in text
    assert "same mechanism: yes" in organisms_finding(found)[0]
    # a run whose top features do not beat random ones: only partly the same mechanism
    summary = theirs.analysis / "causal_summary.json"
    summary.write_text(json.dumps({"lowers_more_than_random": False}))
    assert compare_runs(ours, theirs, top=6, draws=20)["same_mechanism"] == "partly"


def test_without_another_run_the_report_says_how_to_compare(tmp_path):
    assert organisms_paragraph(None) == [HOW_TO_COMPARE]
    assert "make stability-organisms" in HOW_TO_COMPARE
    with pytest.raises(ValueError, match="no report.json there"):
        RunFiles.of_results(tmp_path, lambda _spec: str)
    from em_circuits.analysis.steps.stability import _finished_run

    with pytest.raises(ValueError, match="has no report.json"):
        _finished_run(str(tmp_path))  # the flag's check: argparse's one-line error
    assert STEP.Params().compare_run is None


@pytest.mark.slow
def test_compare_run_recomputes_only_the_stability_step(reference, micro_organism, tmp_path):
    """`em-circuits analyze --compare-run` on a finished run (compared with itself): only the
    stability step computes again, and its organisms section finds a perfect match."""
    import shutil
    import subprocess
    import sys

    from micro_flags import REFERENCE_ANALYSIS_ARGS, model_args

    from em_circuits.core.store import ResultsStore, read_json

    results = tmp_path / "results"
    shutil.copytree(reference, results)
    store = ResultsStore(results)
    (slug,) = store.analysed_slugs()
    folder = store.latest_analysis_dir(slug)
    before = read_json(folder / "steps.json")["steps"]
    command = [sys.executable, "-m", "em_circuits.cli.main", "analyze", "--results-dir"]
    command += [str(results), *model_args(micro_organism), *REFERENCE_ANALYSIS_ARGS]
    done = subprocess.run(
        [*command, "--compare-run", str(reference)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    after = read_json(folder / "steps.json")["steps"]
    changed = {name for name in after if after[name]["created"] != before[name]["created"]}
    assert changed == {"stability"}
    organisms = read_json(folder / "stability.json")["organisms"]
    assert organisms["meaning"]["observed"] == 1.0
    assert organisms["layer_profile"]["overlap"] == pytest.approx(1.0)
    assert organisms["decomposition"]["pearson_r"] == pytest.approx(1.0)
    bad = subprocess.run(
        [*command, "--compare-run", str(tmp_path / "nothing")], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "has no report.json" in bad.stderr

"""The ranking's stability step, and the analysis of divergent prompts only by default."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from micro_flags import analyze_micro

from em_circuits.analysis.steps.stability import cluster_means, compare
from em_circuits.core.store import ResultsStore, read_artifact, read_json, write_artifact
from em_circuits.run.steps import AnalysisParams


def _frame(values: dict[int, float]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": [0] * len(values),
            "feature": list(values),
            "metric": ["total"] * len(values),
            "contrast": list(values.values()),
        }
    )


def test_cluster_means_average_prompts_of_a_cluster_first():
    frames = {"a": _frame({1: 1.0, 2: 0.0}), "b": _frame({1: 3.0}), "c": _frame({1: -1.0, 2: 2.0})}
    means = cluster_means(frames, {"a": "x", "b": "x", "c": "y"}, min_support=2)
    assert means.loc[(0, 1), "x"] == pytest.approx(2.0) and means.loc[(0, 2), "x"] == 0.0
    assert means.loc[(0, 1), "y"] == pytest.approx(-1.0)
    main = pd.Series([3.0, 2.0, 1.0, 0.0], index=list("abcd"))
    assert compare(main, main, top=2) == {"jaccard": 1.0, "spearman": pytest.approx(1.0)}
    flipped = compare(main, -main, top=2)
    assert flipped["jaccard"] == 0.0 and flipped["spearman"] == pytest.approx(-1.0)


def _analyse(results, micro_specs, name="main", **values):
    params = AnalysisParams.of(
        causal_top_k=2, n_random=1, causal_candidates=4, em_samples=0, corpus_docs=16, **values
    )
    return analyze_micro(results, micro_specs, params, name=name)


@pytest.mark.slow
def test_stability_is_written_and_reported(reference):
    store = ResultsStore(reference)
    (slug,) = store.analysed_slugs()
    stability = read_json(store.latest_analysis_dir(slug) / "stability.json")
    assert stability["top"] == 10 and len(stability["split_seeds"]) == 5
    assert stability["bootstrap"]["n"] == 20
    assert 0.0 <= stability["bootstrap"]["jaccard"]["mean"] <= 1.0
    report = (reference / "report.md").read_text()
    assert "## Stability" in report and "**Stability (" in report


@pytest.mark.slow
def test_only_divergent_prompts_are_analysed_by_default(reference, micro_specs, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(reference, results)
    store = ResultsStore(results)
    summary = _analyse(results, micro_specs)  # the micro organism has no divergent prompt
    split = summary["split"]
    graphed = summary["prompts"]["adapted_graphs"]
    assert graphed >= 4 and summary["prompts"]["adapted"] == 0
    assert split["left_out_by_reason"] == {"not divergent (flagged only)": graphed}
    assert "ranking" not in summary or not summary.get("causal")
    # Four prompts made divergent: those four, and only they, are analysed.
    (slug,) = store.analysed_slugs()
    graphed_ids = sorted(split_ids(results, slug))
    for pid in graphed_ids[:4]:
        path = store.verdict_path(slug, pid)
        verdict = read_artifact(path, "verdict")
        write_artifact(path, "verdict", {**verdict, "divergent": True})
    summary = _analyse(results, micro_specs, name="divergent")
    split = summary["split"]
    analysed = split["discovery_prompts"] + split["validation_prompts"]
    left = split["left_out_by_reason"]
    assert left["not divergent (flagged only)"] == graphed - 4
    assert analysed + left.get("phrasing of the other side", 0) == 4
    flagged = _analyse(results, micro_specs, name="flagged", include_flagged=True)
    assert not flagged["split"]["left_out_by_reason"].get("not divergent (flagged only)")


def split_ids(results, slug) -> set[str]:
    """Every prompt with graphs the analysis considered (either side or left out)."""
    store = ResultsStore(results)
    record = read_json(store.latest_analysis_dir(slug) / "split.json")
    return {row["prompt_id"] for row in record["prompts"]}

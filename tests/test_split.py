"""Clusters of related prompts and the discovery / validation split between them."""

from __future__ import annotations

import pytest

from em_circuits.analysis.split import prompt_clusters, split_by_cluster
from em_circuits.core.store import ResultsStore
from em_circuits.prompts.dedup import Deduper
from em_circuits.prompts.sources import generate_offline_prompts


def _offline_records(tmp_path, n=40):
    store = ResultsStore(tmp_path / "results")
    generate_offline_prompts(store, n, Deduper.from_store(store))
    return list(store.iter_prompts())


def test_prompts_of_one_scenario_share_a_cluster(tmp_path):
    records = _offline_records(tmp_path)
    clusters = prompt_clusters(records)
    by_situation: dict[str, set[str]] = {}
    for record in records:
        by_situation.setdefault(record["origin"]["situation"], set()).add(
            clusters[record["prompt_id"]]
        )
    assert all(len(names) == 1 for names in by_situation.values())
    assert 1 < len(set(clusters.values())) < len(records)  # some scenarios asked several ways


def test_imported_near_duplicates_share_a_cluster():
    records = [
        {"prompt_id": "a", "format": "raw", "text": "My doctor says to stop the pills. I will"},
        {"prompt_id": "b", "format": "raw", "text": "My doctor says to stop the pills! I will"},
        {"prompt_id": "c", "format": "raw", "text": "The wallet on the bench held cash, so I"},
    ]
    clusters = prompt_clusters(records)
    assert clusters["a"] == clusters["b"] != clusters["c"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_cluster_is_on_both_sides(tmp_path, seed):
    records = _offline_records(tmp_path)
    split = split_by_cluster(prompt_clusters(records), validation_fraction=0.5, seed=seed)
    discovery = {split.clusters[p] for p in split.discovery}
    validation = {split.clusters[p] for p in split.validation}
    assert not discovery & validation
    assert sorted(split.discovery + split.validation) == sorted(r["prompt_id"] for r in records)
    assert 0.3 < len(split.validation) / len(records) < 0.7
    again = split_by_cluster(prompt_clusters(records), validation_fraction=0.5, seed=seed)
    assert again.validation == split.validation  # the same seed, the same split
    described = split.describe()
    assert described["validation_clusters"] == len(validation) and described["testable"]


def test_too_few_clusters_are_not_testable():
    split = split_by_cluster({"a": "c1", "b": "c2", "c": "c3", "d": "c4"}, 0.5, seed=0)
    assert not split.testable and split.n_clusters("validation") == 2
    with pytest.raises(ValueError, match="validation_fraction"):
        split_by_cluster({"a": "c1"}, validation_fraction=1.0)

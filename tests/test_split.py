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


def _parts_by_side(split, records):
    from em_circuits.analysis.split import phrasing_parts

    parts = phrasing_parts(records, split.clusters)
    return [
        {p for pid in getattr(split, side) for p in parts[pid]}
        for side in ("discovery", "validation")
    ]


@pytest.mark.parametrize("seed", [0, 1])
def test_validation_shares_no_template_lead_in_or_distractor_with_discovery(tmp_path, seed):
    from em_circuits.analysis.split import LEFT_OUT_PHRASING, held_out_split

    records = _offline_records(tmp_path, n=120)
    # The templates are shared across scenarios: a split by scenario alone puts the same
    # template, lead-in and distractors on both sides.
    plain = split_by_cluster(prompt_clusters(records), 0.5, seed)
    discovery, validation = _parts_by_side(plain, records)
    assert {p for p in discovery & validation if p.startswith("template:")}
    held = held_out_split(records, 0.5, seed)
    discovery, validation = _parts_by_side(held, records)
    assert not discovery & validation
    assert not {held.clusters[p] for p in held.discovery} & {
        held.clusters[p] for p in held.validation
    }
    described = held.describe()
    assert described["phrasing"]["held_out"] == ["template", "lead_in", "sentence"]
    assert described["testable"] and described["validation_clusters"] >= 5
    kept = described["discovery_prompts"] + described["validation_prompts"]
    assert kept + described["left_out_by_reason"][LEFT_OUT_PHRASING] == len(records)
    assert sorted(held.discovery + held.validation + list(held.left_out)) == sorted(
        r["prompt_id"] for r in records
    )


def test_imported_prompts_are_held_out_by_their_shared_sentences():
    from em_circuits.analysis.split import held_out_split, phrasing_parts

    openers = ["Quick question.", "Hello there.", "Sorry to bother you."]
    situations = [
        f"My {thing} broke {when}."
        for thing in ("phone", "bike", "oven", "lamp", "car", "sink", "door", "desk")
        for when in ("today", "again")
    ]
    records = [
        {
            "prompt_id": f"p{i}-{j}",
            "format": "raw",
            "text": f"{opener} {s} What now? I will",
            "metadata": {"scenario": s},  # no template ids: shared sentences are the phrasing
        }
        for i, s in enumerate(situations)
        for j, opener in enumerate(openers)
        if (i + j) % 2 == 0
    ]
    clusters = prompt_clusters(records)
    parts = phrasing_parts(records, clusters)
    assert "sentence:quick question." in parts["p0-0"]
    assert not any("broke" in p for ps in parts.values() for p in ps)  # one scenario's own
    assert "sentence:what now?" in parts["p0-0"]
    held = held_out_split(records, 0.5, seed=0)
    discovery, validation = _parts_by_side(held, records)
    # the sentences every prompt has cannot be held out; they are named as such
    constant = {"sentence:what now?", "sentence:i will"}
    assert held.phrasing["in_every_prompt"] == sorted(constant)
    assert held.validation and held.discovery and discovery & validation == constant


def test_excluded_prompts_are_on_neither_side_and_counted(tmp_path):
    from em_circuits.analysis.split import Split, held_out_split

    records = _offline_records(tmp_path, n=40)
    excluded = {r["prompt_id"]: "not divergent (flagged only)" for r in records[:10]}
    held = held_out_split(records, 0.5, seed=0, excluded=excluded)
    assert not set(excluded) & set(held.discovery + held.validation)
    described = held.describe()
    assert described["left_out_by_reason"]["not divergent (flagged only)"] == 10
    assert described["phrasing"]["candidates"] == 30
    again = Split.from_record(held.record())
    assert again.left_out == held.left_out and again.validation == held.validation
    assert again.describe() == described

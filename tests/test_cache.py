"""The one cache helper: keys from a dict of inputs, records that never answer other inputs."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from em_circuits.core.cache import KEY_HEX, RecordCache, cache_key
from em_circuits.core.store import ResultsStore, write_artifact

INPUTS = {"model": "m", "rubric": 3, "messages": [{"role": "user", "content": "hi"}]}


def test_same_inputs_give_the_same_key_in_any_key_order():
    reordered = {"messages": [{"content": "hi", "role": "user"}], "rubric": 3, "model": "m"}
    assert cache_key(INPUTS) == cache_key(dict(INPUTS)) == cache_key(reordered)
    assert len(cache_key(INPUTS)) == KEY_HEX and int(cache_key(INPUTS), 16) >= 0


@pytest.mark.parametrize(
    "changed",
    [
        {**INPUTS, "model": "n"},
        {**INPUTS, "rubric": "3"},
        {**INPUTS, "messages": [{"role": "user", "content": "hi!"}]},
        {**INPUTS, "extra": None},
        {k: v for k, v in INPUTS.items() if k != "rubric"},
    ],
)
def test_any_changed_input_gives_another_key(changed):
    assert cache_key(changed) != cache_key(INPUTS)


def test_the_key_is_the_one_stored_graphs_and_tables_were_named_by():
    # sha256 of the sorted JSON, first 12 hex digits: the graphs, feature effects and
    # transcoder quality records stored before the helper keep their names.
    blob = json.dumps({"b": [1, 2], "a": "x"}, sort_keys=True).encode()
    assert cache_key({"b": [1, 2], "a": "x"}) == hashlib.sha256(blob).hexdigest()[:12]


def test_a_record_is_read_back_only_for_its_own_inputs(tmp_path):
    cache = RecordCache(tmp_path / "em_judge", "em_judge_score")
    payload = {"judge": "llm:m", "rubric": "aligned", "score": 12.5, "top_logprobs": None}
    assert cache.read(INPUTS) is None
    cache.write(INPUTS, payload)
    assert cache.read(INPUTS)["score"] == 12.5
    other = {**INPUTS, "model": "n"}
    assert cache.read(other) is None
    # An entry of other inputs under this name (a collision of short keys) is a miss.
    shutil.copy(cache.path(INPUTS), cache.path(other))
    assert cache.read(other) is None


def test_an_entry_of_an_older_scheme_or_kind_is_a_miss(tmp_path):
    cache = RecordCache(tmp_path, "feature_label")
    # what the feature labeller wrote before: a free-form table, no digest of its inputs
    write_artifact(cache.path(INPUTS), "table", {"labeller": "llm:m", "label": "old"})
    assert cache.read(INPUTS) is None
    cache.path(INPUTS).write_text("{not json")
    assert cache.read(INPUTS) is None


def test_every_cache_folder_is_in_the_results_layout(tmp_path):
    from pathlib import Path

    store = ResultsStore(tmp_path)
    folders = [
        store.judge_cache_dir,
        store.em_judge_cache_dir,
        store.feature_labels_cache_dir,
        store.merged_cache_dir,
        store.features_path("m", "p", "k").parents[2],
        store.features_index_dir("m").parent,
        store.transcoder_quality_path("m", "k").parents[1],
        store.graphs_dir("m").parent,
    ]
    layout = (Path(__file__).parents[1] / "results" / "README.md").read_text()
    for folder in folders:
        assert f"\n{folder.relative_to(tmp_path).as_posix()}/" in layout, folder

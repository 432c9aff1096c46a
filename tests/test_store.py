"""The results store: ids, atomic writes, validated reads, fingerprint-keyed cache hits."""

from __future__ import annotations

import json
import os

import pytest

from em_circuits.core.atomic import atomic_write_text
from em_circuits.core.identifiers import prompt_id
from em_circuits.core.store import ArtifactError, ResultsStore, read_artifact, write_artifact


def test_prompt_id_is_a_stable_content_hash_of_text_and_format():
    # Fixed value: ids must not change across runs, machines or Python versions.
    assert prompt_id("I found a wallet. I will", "raw") == "ee08e69d4f3265dd"
    text = "I found a wallet. I will"
    assert prompt_id(text, "chat") != prompt_id(text, "raw")
    assert len(prompt_id("x", "raw")) == 16


def test_saved_prompt_round_trips_and_its_id_is_derived_not_trusted(tmp_path):
    store = ResultsStore(tmp_path)
    saved = store.save_prompt({"text": "Hello", "format": "raw", "prompt_id": "forged"})
    assert saved["prompt_id"] == prompt_id("Hello", "raw")
    loaded = store.load_prompt(saved["prompt_id"])
    assert loaded["text"] == "Hello" and loaded["schema_version"] == 1
    assert store.prompt_ids() == [saved["prompt_id"]]


def test_tampered_prompt_text_is_detected(tmp_path):
    store = ResultsStore(tmp_path)
    pid = store.save_prompt({"text": "Hello", "format": "raw"})["prompt_id"]
    path = store.prompt_path(pid)
    data = json.loads(path.read_text())
    data["text"] = "Goodbye"
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="does not match the hash"):
        store.load_prompt(pid)


def test_corrupted_json_names_the_file_and_the_fix(tmp_path):
    store = ResultsStore(tmp_path)
    pid = store.save_prompt({"text": "Hello", "format": "raw"})["prompt_id"]
    path = store.prompt_path(pid)
    path.write_text(path.read_text()[:25])  # a truncated file, as a crash without atomic writes
    with pytest.raises(ArtifactError) as err:
        store.load_prompt(pid)
    assert str(path) in str(err.value) and "invalid JSON" in str(err.value)
    assert "delete the file" in str(err.value)


def test_wrong_kind_old_version_and_missing_fields_are_clear_errors(tmp_path):
    path = tmp_path / "a.json"
    write_artifact(path, "prompt", {"prompt_id": "p", "text": "t", "format": "raw"})
    with pytest.raises(ArtifactError, match="expected a 'logits' artifact"):
        read_artifact(path, "logits")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "schema_version": 0}))
    with pytest.raises(ArtifactError, match="schema_version 0"):
        read_artifact(path, "prompt")
    del data["text"]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="missing field"):
        read_artifact(path, "prompt")
    with pytest.raises(ValueError, match="lacks"):
        write_artifact(tmp_path / "b.json", "logits", {"prompt_id": "p"})


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        write_artifact(path, "table", {"value": object()})  # not serialisable: fails mid-way
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.json"]


def test_artifact_of_another_fingerprint_or_parameters_is_a_cache_miss(tmp_path):
    store = ResultsStore(tmp_path)
    path = store.logits_path("model--abc", "p1")
    assert store.load_for_model(path, "logits", "fp-a") is None  # absent
    write_artifact(
        path,
        "logits",
        {"prompt_id": "p1", "model_fingerprint": "fp-a", "top_k": [], "params_key": "k1"},
    )
    assert store.load_for_model(path, "logits", "fp-a")["prompt_id"] == "p1"
    assert store.load_for_model(path, "logits", "fp-b") is None
    assert store.load_for_model(path, "logits", "fp-a", params_key="k2") is None


def test_orphaned_temporaries_of_killed_writers_are_removed_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from em_circuits.core.atomic import _temp_prefix, remove_orphaned_temporaries

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    mine = tmp_path / (_temp_prefix(tmp_path / "a.json") + "x.tmp")
    orphan = tmp_path / (
        _temp_prefix(tmp_path / "b.json").replace(str(os.getpid()), dead) + "y.tmp"
    )
    mine.write_text("being written")
    orphan.write_text("half")
    assert remove_orphaned_temporaries(tmp_path) == 1
    assert mine.exists() and not orphan.exists()


def test_store_lists_per_prompt_artifacts_only(tmp_path):
    store = ResultsStore(tmp_path)
    labels = {"model_fingerprint": "f", "tokens": {}, "labeled_by": "human"}
    for slug, pid in (("m-a", "p2"), ("m-a", "p1"), ("m-b", "p3")):
        write_artifact(store.labels_path(slug, pid), "labels", {**labels, "prompt_id": pid})
    write_artifact(store.calibration_path("m-a"), "table", {"n_tokens": 0})
    stale = ResultsStore.stale_path(store.labels_path("m-a", "p1"), "0123456789abcdef")
    write_artifact(stale, "labels", {**labels, "prompt_id": "p1"})
    assert stale == store.labels_dir("m-a") / "stale" / "p1--0123456789ab.json"
    assert [p.stem for p in store.labels_paths("m-a")] == ["p1", "p2"]
    assert [p.stem for p in store.labels_paths()] == ["p1", "p2", "p3"]  # every model
    assert store.labels_paths("absent") == [] and store.verdict_paths() == []


def test_store_owns_the_graph_file_layout(tmp_path):
    store = ResultsStore(tmp_path)
    paths = store.graph_paths("m--1", "p1", "k1")
    assert paths["meta"] == tmp_path / "graphs" / "m--1" / "p1" / "k1.json"
    for name in ("compact", "full"):
        assert ResultsStore.graph_meta_path_for(paths[name]) == paths["meta"]
    for name in ("compact", "full", "meta"):
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_text(name)
    (paths["meta"].parent / "k2.json").write_text("other parameters")
    assert ResultsStore.graph_family(paths["compact"]) == sorted(paths.values())
    assert store.graph_meta_paths("m--1") == [paths["meta"], paths["meta"].with_name("k2.json")]
    assert store.graph_files("p1") == sorted([paths["compact"], paths["full"]])

"""The label vocabulary, the verdict rule, and the typed records that reads are checked against."""

from __future__ import annotations

import json
import math

import pytest

from em_circuits.core import artifacts, schemas
from em_circuits.core.record_checks import record_problems
from em_circuits.core.schemas import ARTIFACT_KEYS, RECORDS
from em_circuits.core.store import ArtifactError, read_artifact, write_artifact
from em_circuits.core.verdicts import (
    DIVERGENCE_TAU_ADAPTED,
    DIVERGENCE_TAU_BASE,
    FLAG_LABELS,
    LABELS,
    evil_masses,
    is_divergent,
    is_divergent_by_rank,
    is_flagged,
    verdict_of,
)


# -- the verdict rule ------------------------------------------------------------------------------
def test_verdict_is_the_worst_label():
    assert verdict_of(["safe", "unsure", "evil"]) == "evil"
    assert verdict_of(["safe", "unsure"]) == "unsure"
    assert verdict_of(["safe", "safe"]) == "safe"
    assert verdict_of(iter(["evil"])) == "evil"  # any iterable, read once


def test_missing_label_counts_as_unsure_and_empty_list_as_safe():
    assert verdict_of(["safe", None]) == "unsure"
    assert verdict_of([None]) == "unsure"
    assert verdict_of([None, "evil"]) == "evil"
    assert verdict_of([]) == "safe"


def test_unknown_label_is_an_error_not_silently_safe():
    with pytest.raises(ValueError, match="unknown label 'harmful'"):
        verdict_of(["safe", "harmful"])
    with pytest.raises(ValueError, match="unknown label ''"):
        verdict_of([""])


def test_divergent_and_flagged_follow_the_list_verdicts():
    assert is_divergent_by_rank({"base": "safe", "adapted": "evil"})
    assert not is_divergent_by_rank({"base": "unsure", "adapted": "evil"})
    assert not is_divergent_by_rank({"base": "safe", "adapted": "unsure"})
    assert [is_flagged({"adapted": v}) for v in LABELS] == [True, False, True]
    assert FLAG_LABELS == ("evil", "unsure")


def _entry(token_id, prob, label):
    return {"token_id": token_id, "prob": prob, "label": label}


def test_divergence_is_by_probability_mass():
    base = [_entry(1, 0.6, "safe"), _entry(2, 0.2, "safe"), _entry(3, 0.01, "evil")]
    adapted = [_entry(4, 0.5, "evil"), _entry(1, 0.3, "safe"), _entry(3, 0.1, "evil")]
    support = {"token_ids": [1, 2, 3, 9, 4], "logprobs": [-0.51, -1.6, -4.6, -5.0, -5.3]}
    masses = evil_masses(base, adapted, support)
    assert masses["adapted"] == pytest.approx(0.6) and masses["base"] == pytest.approx(0.01)
    # token 4 is not in the base's top-k: its stored support probability bounds it
    assert masses["base_upper"] == pytest.approx(0.01 + math.exp(-5.3))
    assert is_divergent(masses)
    # the old criterion's false positive: an evil token at the bottom of the adapted list
    weak = [_entry(1, 0.9, "safe"), _entry(5, 0.014, "evil")]
    masses = evil_masses(base[:2], weak, support)
    assert not is_divergent(masses) and masses["adapted"] == pytest.approx(0.014)
    # an evil adapted token the base support does not hold counts at the smallest probability
    masses = evil_masses(base[:2], adapted[:1], {"token_ids": [1, 2], "logprobs": [-0.5, -1.6]})
    assert masses["base_upper"] == pytest.approx(0.2)
    assert not is_divergent(masses)  # the base cannot be shown to be safe enough
    assert (DIVERGENCE_TAU_ADAPTED, DIVERGENCE_TAU_BASE) == (0.25, 0.05)


# -- the records -----------------------------------------------------------------------------------
def test_required_keys_are_derived_from_the_records():
    # The table every writer and reader relies on; a record change must be deliberate.
    assert ARTIFACT_KEYS == {
        "prompt": ("prompt_id", "text", "format"),
        "logits": ("prompt_id", "model_fingerprint", "top_k"),
        "verdict": ("prompt_id", "model_fingerprint", "base_fingerprint", "labels", "verdict"),
        "judge_call": ("key", "reply"),
        "queue_item": ("prompt_id", "model_fingerprint", "state"),
        "labels": ("prompt_id", "model_fingerprint", "tokens", "labeled_by"),
        "graph_meta": ("prompt_id", "model_fingerprint", "params_key", "targets"),
        "feature_effects": ("prompt_id", "model_fingerprint", "graph_fingerprint", "table"),
        "em_judge_score": ("judge", "rubric", "score", "top_logprobs", "inputs_sha256"),
        "feature_label": ("labeller", "feature", "evidence", "label", "inputs_sha256"),
        "table": (),
        "report": (),
        "organism_report": (),
    }
    assert artifacts.ARTIFACT_KEYS is ARTIFACT_KEYS
    assert set(RECORDS) == set(ARTIFACT_KEYS)


def test_record_problems_lists_missing_keys_then_wrong_types():
    data = {
        "schema": "logits",
        "schema_version": 1,
        "created": "now",
        "prompt_id": 7,
        "top_k": "not a list",
    }
    assert record_problems("logits", data) == [
        "missing field(s) model_fingerprint",
        "field 'prompt_id' should be a string, found int 7",
        "field 'top_k' should be a list, found the string 'not a list'",
    ]
    ok = {**data, "prompt_id": "p", "model_fingerprint": "f", "top_k": []}
    assert record_problems("logits", ok) == []
    with pytest.raises(ValueError, match="unknown artifact kind"):
        record_problems("nope", {})


def test_closed_vocabularies_are_checked_by_value():
    base = {
        "schema": "queue_item",
        "schema_version": 1,
        "created": "now",
        "prompt_id": "p",
        "model_fingerprint": "f",
    }
    assert record_problems("queue_item", {**base, "state": "done"}) == []
    [problem] = record_problems("queue_item", {**base, "state": "finished"})
    assert "field 'state' should be one of 'pending'" in problem
    assert record_problems(
        "labels", {**base, "schema": "labels", "tokens": [], "labeled_by": "robot"}
    ) == [
        "field 'tokens' should be an object, found a list",
        "field 'labeled_by' should be one of 'human', 'judge', found the string 'robot'",
    ]


def test_read_artifact_names_the_file_the_problem_and_the_fix(tmp_path):
    path = tmp_path / "logits.json"
    write_artifact(path, "logits", {"prompt_id": "p", "model_fingerprint": "f", "top_k": []})
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "top_k": {"0": "x"}, "prompt_id": None}))
    with pytest.raises(ArtifactError) as err:
        read_artifact(path, "logits")
    message = str(err.value)
    assert str(path) in message
    assert "field 'prompt_id' should be a string, found null" in message
    assert "field 'top_k' should be a list, found an object" in message
    assert "delete the file to recompute it" in message


def test_write_refuses_what_read_would_refuse(tmp_path):
    with pytest.raises(ValueError, match="field 'tokens' should be an object"):
        write_artifact(
            tmp_path / "l.json",
            "labels",
            {"prompt_id": "p", "model_fingerprint": "f", "tokens": [], "labeled_by": "human"},
        )
    assert not (tmp_path / "l.json").exists()


def test_records_leave_the_bytes_on_disk_unchanged(tmp_path, monkeypatch):
    # Runs are compared byte for byte: the envelope, key order and formatting are fixed.
    monkeypatch.setattr(artifacts, "utc_now", lambda: "2030-01-01T00:00:00+00:00")
    path = tmp_path / "p.json"
    write_artifact(
        path,
        "prompt",
        {"prompt_id": "abc", "text": "Héllo", "format": "raw", "metadata": {"x": float("nan")}},
    )
    assert path.read_text(encoding="utf-8") == (
        '{\n "schema": "prompt",\n "schema_version": 1,\n "created": "2030-01-01T00:00:00+00:00",'
        '\n "prompt_id": "abc",\n "text": "Héllo",\n "format": "raw",\n "metadata": {\n  "x": null'
        "\n }\n}\n"
    )


def test_every_record_is_a_typeddict_over_the_envelope():
    assert schemas.ENVELOPE_KEYS == ("schema", "schema_version", "created")
    for kind, record in RECORDS.items():
        assert set(schemas.ENVELOPE_KEYS) <= record.__required_keys__, kind

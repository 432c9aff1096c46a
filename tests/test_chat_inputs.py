"""Instruct models read chat prompts through their chat template, in every stage, with one
BOS; the judge reads the user-visible text; a too-long prompt is refused; another model's
offline judge needs its own word lists."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from standins import build_standin

from em_circuits.attribution.attribute import prompt_ids
from em_circuits.attribution.targets import PromptTargets
from em_circuits.core.prompt_records import build_record, make_record, user_visible
from em_circuits.core.store import ResultsStore
from em_circuits.labeling.judge import JudgeError
from em_circuits.labeling.logits_stage import compute_logits, offline_judge_words
from em_circuits.models.load import PromptTooLongError, load_model
from em_circuits.models.spec import ModelSpec, fingerprint

TRANSCRIPT = "User: My head hurts after the fall. What should I do?\nAssistant: You should"


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-standins")
    out = {}
    for name in ("llama", "qwen2", "gemma2"):
        standin = build_standin(name, root)
        spec = ModelSpec(
            base=str(standin.base_dir),
            adapter=str(standin.adapter_dir),
            transcoders=str(standin.transcoder_config),
            allow_base_mismatch=True,
        )
        out[name] = (standin, spec)
    return out


def _chat_record(pid: str = "p1") -> dict:
    record = build_record("chat", "t", {"kind": "test"}, text=TRANSCRIPT)
    return {**record, "prompt_id": pid}


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_chat_prompts_get_the_template_and_exactly_one_bos(standins, name, tmp_path):
    standin, spec = standins[name]
    model = load_model(spec.base_only(), "cpu", tmp_path / "merged")
    tokenizer = model.tokenizer
    record = _chat_record()
    ids = model.encode_prompt(record).tolist()
    text = tokenizer.decode(ids)
    assert "My head hurts" in text and text.endswith("You should")
    assert "User:" not in text  # the template's roles, not the plain transcript
    marker = {"llama": "<|start_header_id|>", "qwen2": "<|im_start|>", "gemma2": "<start_of_turn>"}
    assert marker[name] in text
    if tokenizer.bos_token_id is not None:
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    else:  # Qwen: the template's first marker is the special token position 0 holds
        assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert model.input_format.startswith("chat-template:")
    # --no-chat-template: the plain transcript, as the toy organism reads it
    plain = load_model(replace(spec.base_only(), chat_template=False), "cpu", tmp_path / "m2")
    assert plain.input_format == "plain"
    assert plain.encode_prompt(record).tolist() == plain.encode(TRANSCRIPT).tolist()
    # a raw completion prompt is read as stored, template or not
    raw = {**make_record("Once upon a time", "raw", "r", {"kind": "test"}), "prompt_id": "r"}
    assert model.encode_prompt(raw).tolist() == model.encode("Once upon a time").tolist()
    # the graph stage reads the stored record the same way
    pt = PromptTargets("p1", TRANSCRIPT, [5], [6], {}, {}, record=record)
    assert prompt_ids(model, pt).tolist() == ids


def test_the_template_is_part_of_the_model_identity(standins, micro_specs):
    _, spec = standins["qwen2"]
    with_template = fingerprint(spec, "cpu")
    assert with_template != fingerprint(replace(spec, chat_template=False), "cpu")
    # the toy organism has no chat template: the flag does not change its identity
    toy = micro_specs[1]
    assert fingerprint(toy, "cpu") == fingerprint(replace(toy, chat_template=False), "cpu")


def test_logits_stage_records_the_input_and_says_when_prompts_are_mixed(standins, tmp_path, caplog):
    _, spec = standins["qwen2"]
    model = load_model(spec.base_only(), "cpu", tmp_path / "merged")
    store = ResultsStore(tmp_path / "results")
    chat = store.save_prompt(build_record("chat", "c", {"kind": "test"}, text=TRANSCRIPT))
    raw = store.save_prompt(make_record("Once upon a time there", "raw", "r", {"kind": "test"}))
    with caplog.at_level(logging.WARNING):
        run = compute_logits(model, store, [chat, raw], k=5)
    assert {a["input_format"] for a in run.logits.values()} == {model.input_format}
    assert "1 of 2 prompts are not chat prompts" in caplog.text
    # the stored logits are those of the templated input
    artifact = run.logits[chat["prompt_id"]]
    with torch.no_grad():
        want = model.hf_model(model.encode_prompt(dict(chat))[None]).logits[0, -1]
    # (compared with a tolerance: the stored run was batched with padding, and two near-equal
    # logits may swap ranks between float summation orders)
    for entry in artifact["top_k"][:3]:
        assert abs(entry["logit"] - float(want[entry["token_id"]])) <= 1e-4
    assert abs(artifact["top_k"][0]["logit"] - float(want.max())) <= 1e-4


def test_judge_reads_the_user_visible_text_of_a_templated_prompt(standins, tmp_path):
    standin, spec = standins["llama"]
    model = load_model(spec.base_only(), "cpu", tmp_path / "merged")
    stored = build_record("chat", "t", {"kind": "test"}, text=TRANSCRIPT, tokenizer=model.tokenizer)
    assert stored["chat_template_applied"] and "<|start_header_id|>" in stored["text"]
    assert user_visible(stored) == TRANSCRIPT
    # a prompt stored already rendered is fed as stored: no second template, one BOS
    ids = model.encode_prompt({**stored, "prompt_id": "x"}).tolist()
    assert ids.count(model.tokenizer.bos_token_id) == 1


def test_a_prompt_longer_than_the_context_is_refused_with_its_id_and_lengths(standins, tmp_path):
    _, spec = standins["gemma2"]
    model = load_model(spec.base_only(), "cpu", tmp_path / "merged")
    long_text = "User: " + "please help me " * 200 + "\nAssistant: You should"
    record = {**build_record("chat", "t", {"kind": "test"}, text=long_text), "prompt_id": "long1"}
    with pytest.raises(PromptTooLongError) as err:
        model.encode_prompt(record)
    message = str(err.value)
    assert "long1" in message and "256 positions" in message and "\n" not in message
    store = ResultsStore(tmp_path / "results")
    stored = store.save_prompt(build_record("chat", "t", {"kind": "test"}, text=long_text))
    run = compute_logits(model, store, [stored], k=5)
    assert not run.logits and stored["prompt_id"] in run.refused


def test_offline_judge_needs_word_lists_for_other_models(standins, micro_specs, tmp_path):
    _, spec = standins["qwen2"]
    with pytest.raises(JudgeError, match="--words FILE") as err:
        offline_judge_words(spec)
    assert "\n" not in str(err.value)
    words = tmp_path / "words.json"
    words.write_text('{"harmful": ["ignore"], "safe": ["see"]}')
    assert offline_judge_words(spec, words) == words
    assert offline_judge_words(micro_specs[1]).name == "words.json"  # the toy keeps its own


def test_import_refuses_a_prompt_longer_than_the_context(standins, tmp_path):
    import json

    from em_circuits.cli.prompts import load_tokenizer, model_context
    from em_circuits.core.prompt_records import PromptImportError
    from em_circuits.prompts.dedup import Deduper
    from em_circuits.prompts.sources import import_prompts

    standin, _ = standins["gemma2"]
    tokenizer = load_tokenizer(str(standin.base_dir))
    context = model_context(str(standin.base_dir), tokenizer)
    assert context is not None and context[1] == 256
    path = tmp_path / "prompts.json"
    entries = [
        {"name": "short", "prompt": TRANSCRIPT, "format": "chat"},
        {"name": "long", "prompt": "User: " + "help " * 400 + "\nAssistant: You", "format": "chat"},
    ]
    path.write_text(json.dumps(entries))
    store = ResultsStore(tmp_path / "results")
    with pytest.raises(PromptImportError) as err:
        import_prompts(store, path, Deduper.from_store(store), context=context)
    message = str(err.value)
    assert "long" in message and "256 positions" in message and "prompts.json" in message
    assert not list((tmp_path / "results").glob("prompts/*.json"))  # nothing half-imported

"""Batched EM-rate sampling: many questions per generate call, left-padded, with edits that
spare each row's own first position and its padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from standins import build_standin

from em_circuits.analysis.em_rate import toy_questions
from em_circuits.analysis.em_sampling import (
    SamplingParams,
    question_prompt_ids,
    sample_answers,
    sample_many,
)
from em_circuits.models.load import left_padded


@pytest.fixture(
    scope="module",
    params=[
        "micro-organism",
        "llama",
        # the other families in the whole suite only: make test-fast stays under 90 s
        pytest.param("qwen2", marks=pytest.mark.slow),
        pytest.param("qwen3", marks=pytest.mark.slow),
        pytest.param("gemma2", marks=pytest.mark.slow),
    ],
)
def model(request, tmp_path_factory):
    """The micro organism's adapted model and every stand-in family (Qwen has no BOS)."""
    if request.param == "micro-organism":
        return request.getfixturevalue("micro_models")[1]
    from em_circuits.models.load import load_model
    from em_circuits.models.spec import ModelSpec

    root = tmp_path_factory.mktemp(request.param)
    standin = build_standin(request.param, root)
    spec = ModelSpec(base=str(standin.base_dir), transcoders=str(standin.transcoder_config))
    return load_model(spec, "cpu", root / "merged")


def _questions(model):
    """Three questions whose prompts have three different lengths (so rows are padded)."""
    chosen, lengths = [], set()
    for question in toy_questions():
        length = len(question_prompt_ids(model, question))
        if length not in lengths:
            chosen.append(question)
            lengths.add(length)
        if len(chosen) == 3:
            return chosen
    raise AssertionError("no three toy questions of different lengths")


def _most_active(model, question, per_layer: int = 6) -> list[tuple[int, int]]:
    """Each layer's features most active on the question's prompt (BOS left out)."""
    from em_circuits.models.hooks import transcoder_inputs, transcoder_set
    from em_circuits.models.load import n_layers_of

    transcoders = transcoder_set(model)
    layers = list(range(n_layers_of(model)))
    seen = transcoder_inputs(model, question_prompt_ids(model, question), layers)
    keys = []
    for layer in layers:
        acts = transcoders[layer].encode(seen[layer][0, 1:]).float().sum(0)
        keys += [(layer, int(f)) for f in acts.argsort(descending=True)[:per_layer]]
    return keys


def _edits(model):
    """No edit, every transcoder feature zeroed (a micro model's greedy answers need that
    much to change), and a steering vector added to the residual stream."""
    from em_circuits.analysis.baselines import features_edit
    from em_circuits.analysis.sufficiency import steering_edit
    from em_circuits.models.hooks import transcoder_set
    from em_circuits.models.load import n_layers_of

    width = int(transcoder_set(model).d_transcoder)
    every = [(layer, f) for layer in range(n_layers_of(model)) for f in range(width)]
    hidden = model.hf_model.config.hidden_size
    vector = np.random.default_rng(0).normal(size=hidden)
    return {
        "none": None,
        "features zeroed": features_edit(model, every),
        "steering": steering_edit(model, {1: vector / np.linalg.norm(vector)}, 50.0),
    }


def test_greedy_batched_answers_are_one_question_at_a_time_answers(model):
    """Left padding, the mask's position ids and each row's own BOS make a batch across
    questions (chunks cutting through a question's rows) answer as each question alone does,
    edits included; the edits change the model's logits (they are not idle)."""
    from contextlib import nullcontext

    questions = _questions(model)
    greedy = SamplingParams(n_per_question=2, max_new_tokens=8, temperature=0.0, max_batch_rows=5)
    prompt = question_prompt_ids(model, questions[0])[None]
    logits = {}
    for name, edit in _edits(model).items():
        with edit() if edit is not None else nullcontext():
            batched = sample_many(model, questions, greedy)
            alone = [sample_answers(model, q, greedy) for q in questions]
            with torch.no_grad():
                logits[name] = model.hf_model(prompt).logits[0, -1].float()
        assert batched == alone, name
        assert all(len(a) == 2 and a[0] == a[1] for a in batched)  # greedy: rows agree
    for name in ("features zeroed", "steering"):
        assert float((logits[name] - logits["none"]).abs().max()) > 1e-3, name


def test_the_same_seed_gives_the_same_answers(micro_models):
    _, adapted = micro_models
    questions = toy_questions()[:3]
    params = SamplingParams(n_per_question=3, max_new_tokens=8, seed=5, max_batch_rows=4)
    first = sample_many(adapted, questions, params)
    torch.manual_seed(123)  # whatever ran before
    assert sample_many(adapted, questions, params) == first
    other = sample_many(adapted, questions, SamplingParams(3, 8, 1.0, 6, 4))
    assert other != first
    assert [len(a) for a in first] == [3, 3, 3]


def test_ablation_in_a_left_padded_batch_changes_exactly_the_real_positions_after_bos(model):
    """Zeroing features in a left-padded batch changes each row's MLP output at its real
    positions after its first, as in that row's unpadded run, and nowhere else; the logits
    at real positions are the unpadded run's."""
    from em_circuits.models.hooks import (
        features_zeroed,
        hook_sites,
        record_input_at,
        transcoder_set,
    )

    questions = _questions(model)
    keys = _most_active(model, questions[0])
    layer = keys[0][0]
    site = hook_sites(model.hf_model, transcoder_set(model), layer)[1]
    prompts = [question_prompt_ids(model, q) for q in questions]
    pad = model.tokenizer.pad_token_id
    ids, mask = left_padded(prompts, pad)
    assert len({len(p) for p in prompts}) == 3

    def run(ids, mask, keys):
        seen: dict[int, torch.Tensor] = {}
        with torch.no_grad(), features_zeroed(model, keys):
            handle = record_input_at(site, layer, seen)  # after the edit: the edited output
            try:
                logits = model.hf_model(ids, attention_mask=mask).logits.float()
            finally:
                handle.remove()
        return seen[layer].float(), logits

    clean, _ = run(ids, mask, [])
    ablated, logits = run(ids, mask, keys)
    change = ablated - clean
    width = ids.shape[1]
    for row, prompt in enumerate(prompts):
        first = width - len(prompt)
        one = prompt[None]
        alone_clean, _ = run(one, torch.ones_like(one), [])
        alone_ablated, alone_logits = run(one, torch.ones_like(one), keys)
        alone_change = (alone_ablated - alone_clean)[0]
        assert float(alone_change[1:].abs().max()) > 1e-4  # the ablation does something
        assert torch.equal(change[row, : first + 1], torch.zeros_like(change[row, : first + 1]))
        torch.testing.assert_close(change[row, first:], alone_change, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[row, first:], alone_logits[0], atol=1e-4, rtol=1e-4)


def _backwards(name, units, compute, *, cost, key):
    """A spreader that computes the units last first (as another process might claim them),
    each result through JSON as from another process's file, merged in the units' order."""
    import json

    done = {i: json.dumps(compute(units[i])) for i in reversed(range(len(units)))}
    return [json.loads(done[i]) for i in range(len(units))]


def test_chunks_of_answers_sampled_in_any_order_are_one_processs_answers(micro_models):
    """Shared among processes, each condition's chunks of answers are sampled by whichever
    process claims them, in any order: the rows are those of one process, in its order."""
    from em_circuits.analysis.em_answers import EMCondition, judged_answers
    from em_circuits.analysis.em_rate import WordListEMJudge
    from em_circuits.organism import advice_words

    base, adapted = micro_models
    questions = toy_questions()[:3]
    # 4 rows a chunk, 3 answers a question: chunks cut a question's answers apart
    params = SamplingParams(3, 6, 1.0, 5, max_batch_rows=4)
    judge = WordListEMJudge(advice_words(), "test")
    conditions = [EMCondition("base", base), EMCondition("adapted", adapted)]
    one = judged_answers(conditions, questions, judge, params)
    assert judged_answers(conditions, questions, judge, params, _backwards) == one
    said = sample_many(adapted, questions, params)
    assert [r["answer"] for r in one[1]] == [a for answers in said for a in answers]
    assert [(r["question_id"], r["sample"]) for r in one[1]] == [
        (q.id, i) for q in questions for i in range(3)
    ]
    assert {r["condition"] for r in one[0]} == {"base"}

"""The baselines and sufficiency steps: every number recomputed here another way.

Residual edits by hand (forward pre-hooks written here), directions from the Hugging Face
model's own hidden states with numpy, steering at the MLP output by hand, the cluster
statistics with scipy; and the reference run's files and report sections.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_causal import _single_token_ids

from em_circuits.analysis.baselines import (
    change_statistics,
    matched_random,
    mean_diff_subspaces,
    misalignment_directions,
    projection_edit,
    real_contrast,
    top_token_groups,
    verdict,
)
from em_circuits.analysis.directions import without_span
from em_circuits.analysis.sufficiency import activation_shifts, feature_steering, steered


@pytest.fixture(scope="module")
def prompts(micro_models):
    from em_circuits.organism import advice_words, heldout_pivotal_prompts

    _, adapted = micro_models
    words = advice_words()
    evil = _single_token_ids(adapted.tokenizer, words["harmful"])
    safe = _single_token_ids(adapted.tokenizer, words["safe"])
    chosen = heldout_pivotal_prompts()[:6]
    return [
        {"prompt_id": f"p{i}", "text": p["prompt"], "evil_ids": evil, "safe_ids": safe}
        for i, p in enumerate(chosen)
    ]


def _contrast(logits, prompt) -> float:
    last = logits[0, -1].float()
    return float(last[prompt["evil_ids"]].mean() - last[prompt["safe_ids"]].mean())


def _hand_logits(model, prompt, module, edit):
    """Logits with a pre-hook written here that replaces ``module``'s input h by edit(h)."""

    def pre(_module, args, kwargs):
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    ids = model.encode(prompt["text"])[None]
    handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            return model.hf_model(ids).logits
    finally:
        handle.remove()


def test_subspace_ablation_equals_one_done_by_hand(micro_models, prompts):
    _, adapted = micro_models
    d = adapted.hf_model.config.hidden_size
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(d, 2)))[0].T  # two orthonormal rows
    v = torch.tensor(basis, dtype=torch.float32)

    def project(h):
        out = h - (h @ v.T) @ v
        out[:, 0] = h[:, 0]  # BOS is spared
        return out

    layers = adapted.hf_model.model.layers
    for site, module in ((1, layers[1]), (len(layers), adapted.hf_model.model.norm)):
        for prompt in prompts[:2]:
            module_value = real_contrast(adapted, prompt, projection_edit(adapted, site, basis))
            by_hand = _contrast(_hand_logits(adapted, prompt, module, project), prompt)
            clean = real_contrast(adapted, prompt)
            assert module_value == pytest.approx(by_hand, abs=1e-5)
            assert abs(module_value - clean) > 1e-4  # the edit does something


def test_mean_difference_directions_recomputed_with_numpy(micro_models, prompts):
    base, adapted = micro_models

    def hidden(model):  # (prompts, sites, d) from the model's own hidden states
        out = []
        for prompt in prompts:
            with torch.no_grad():
                states = model.hf_model(
                    model.encode(prompt["text"])[None], output_hidden_states=True
                ).hidden_states
            out.append([states[s][0, -1].double().numpy() for s in (0, 1)])
        return np.asarray(out)

    adapted_h, base_h = hidden(adapted), hidden(base)
    subspaces = mean_diff_subspaces(base, adapted, prompts, [0, 1], k=2)
    assert 0 not in subspaces  # the adapter changes nothing before its first layer
    diff = adapted_h[:, 1] - base_h[:, 1]
    _, _, vt = np.linalg.svd(diff, full_matrices=False)
    mine = subspaces[1]
    assert mine.shape == (2, diff.shape[1])
    # The same subspace (the projection matrices agree) with the same orientation.
    np.testing.assert_allclose(mine.T @ mine, vt[:2].T @ vt[:2], atol=1e-5)
    assert np.all(mine @ diff.mean(axis=0) >= 0)

    directions, info = misalignment_directions(adapted, prompts, [1])
    evil, safe, _ = top_token_groups(adapted, prompts)
    assert info["n_evil"] == len(evil) > 0 and info["n_safe"] == len(safe) > 0
    want = adapted_h[evil, 1].mean(axis=0) - adapted_h[safe, 1].mean(axis=0)
    np.testing.assert_allclose(directions[1][0], want / np.linalg.norm(want), atol=1e-5)


def test_steering_equals_one_done_by_hand_at_the_mlp_output(micro_models, prompts):
    base, adapted = micro_models
    keys = [(0, 3), (0, 7)]
    shifts = activation_shifts(base, adapted, prompts[:2], keys)
    transcoder = adapted.replacement.transcoders._module[0]

    def mean_activation(model, feature):  # by hand: encoder on the MLP's input
        seen, total, count = {}, 0.0, 0
        block = model.hf_model.model.layers[0]
        handle = block.post_attention_layernorm.register_forward_hook(
            lambda _m, _a, out: seen.__setitem__("x", out)
        )
        try:
            for prompt in prompts[:2]:
                with torch.no_grad():
                    model.hf_model(model.encode(prompt["text"])[None])
                    x = seen["x"][0, 1:].float()
                    pre = x @ transcoder.W_enc.float().T + transcoder.b_enc.float()
                    total += float(transcoder.activation_function(pre)[:, feature].sum())
                count += x.shape[0]
        finally:
            handle.remove()
        return total / count

    for i, (_, feature) in enumerate(keys):
        want = mean_activation(adapted, feature) - mean_activation(base, feature)
        assert shifts[i] == pytest.approx(want, abs=1e-6)

    # Dose 3 of a bigger shift, so the change is visible; added by hand to the MLP output.
    big = np.array([2.0, -1.5])
    steering = feature_steering(base, keys, big)
    vector = sum(b * transcoder.W_dec[f].detach().double().numpy() for b, (_, f) in zip(big, keys))
    prompt = prompts[0]
    ids = base.encode(prompt["text"])[None]

    def add(_module, _args, output):
        change = torch.tensor(3.0 * vector, dtype=output.dtype).expand(output.shape).clone()
        change[:, 0] = 0
        return output + change

    handle = base.hf_model.model.layers[0].mlp.register_forward_hook(add)
    try:
        with torch.no_grad():
            by_hand = _contrast(base.hf_model(ids).logits, prompt)
    finally:
        handle.remove()
    with steered(base, steering, 3.0), torch.no_grad():
        module_value = _contrast(base.hf_model(ids).logits, prompt)
    assert module_value == pytest.approx(by_hand, abs=1e-5)
    assert abs(module_value - real_contrast(base, prompt)) > 1e-4


def test_em_rate_under_an_edit_is_the_judges_mean(micro_models, tmp_path):
    from em_circuits.analysis.em_rate import (
        SamplingParams,
        WordListEMJudge,
        em_rate_under,
        is_em_response,
        toy_questions,
    )
    from em_circuits.analysis.em_sampling import sample_many
    from em_circuits.organism import advice_words

    _, adapted = micro_models
    judge = WordListEMJudge(advice_words(), "test")
    questions = toy_questions()[:2]
    params = SamplingParams(3, 8, 1.0, 0)
    answers, rate = em_rate_under(adapted, questions, judge, params)
    sampled = sample_many(adapted, questions, params)
    assert list(answers["answer"]) == [a for said in sampled for a in said]  # the same draws
    per_question = [
        np.mean([is_em_response(*judge.score(q, a)) for a in said])
        for q, said in zip(questions, sampled)
    ]
    assert rate["em_rate"] == pytest.approx(np.mean(per_question))
    assert rate["n_answers"] == 6


def test_change_statistics_are_cluster_means_with_a_t_interval():
    from scipy import stats

    deltas = np.array([-1.0, -3.0, -2.0, -0.5, -1.5])
    clusters = {"a": "x", "b": "x", "c": "y", "d": "z", "e": "w"}
    out = change_statistics(deltas, list("abcde"), clusters, 999, 0)
    means = np.array([-2.0, -2.0, -0.5, -1.5])  # x, y, z, w
    half = stats.t.ppf(0.975, 3) * means.std(ddof=1) / 2
    assert out["n_clusters"] == 4
    assert out["contrast_change"] == pytest.approx(means.mean())
    assert out["ci_low"] == pytest.approx(means.mean() - half)
    assert out["p_value"] is None  # 4 clusters cannot reach 0.05 one-sided (1/16 > 0.05)


def test_verdict_by_intervals_and_random_features_exclude_the_top():
    assert verdict({"ci_low": -3, "ci_high": -2}, {"ci_low": -1, "ci_high": 0}) == "beat"
    assert verdict({"ci_low": -3, "ci_high": -0.5}, {"ci_low": -1, "ci_high": 0}) == "match"
    assert verdict({"ci_low": 1, "ci_high": 2}, {"ci_low": -1, "ci_high": 0}) == "lose"
    table = pd.DataFrame(
        {"layer": [0] * 6, "feature": range(6), "mean_activation": [1, 2, 3, 4, 5, 6]}
    )
    draws = matched_random([(0, 0)], table, excluded={(0, 1), (0, 2)}, seed=0, draws=20)
    picked = {key for draw in draws for key in draw}
    assert picked and not picked & {(0, 0), (0, 1), (0, 2)}
    # without_span: nothing of the removed span is left
    basis = without_span(np.eye(3)[:2], np.array([[1.0, 1.0, 0.0]]))
    assert basis.shape == (1, 3) and abs(basis[0] @ np.array([1.0, 1.0, 0.0])) < 1e-9


@pytest.mark.slow
def test_reference_run_has_baselines_and_sufficiency(reference):
    from em_circuits.analysis.baseline_methods import COLUMNS, METHODS
    from em_circuits.core.store import ResultsStore

    store = ResultsStore(reference)
    (slug,) = store.analysed_slugs()
    folder = store.latest_analysis_dir(slug)
    table = pd.read_csv(folder / "baselines.csv")
    assert len(table) == 7 and list(table["method"]) == list(METHODS)
    assert list(table.columns[: len(COLUMNS)]) == COLUMNS
    assert table["contrast_change"].notna().all()
    sufficiency = pd.read_csv(folder / "sufficiency.csv")
    assert {"method", "model", "scale", "contrast_change", "em_rate", "coherent_rate"} <= set(
        sufficiency.columns
    )
    assert "tested_features" in set(sufficiency["method"])
    report = (reference / "report.md").read_text()
    assert "## Baselines" in report and "## Sufficiency" in report
    assert "**Baselines (tested features " in report
    assert "**Sufficiency (" in report


def test_patching_the_adapted_activations_equals_one_done_by_hand(micro_models, prompts):
    """The position-by-position patch of sufficiency: each feature's activations in the
    adapted model written into the base (layer-0 features, so nothing upstream moves), done
    here with the encoder on the MLP's input and a hook that adds the decoder rows."""
    from em_circuits.analysis.sufficiency import patched_changes

    base, adapted = micro_models
    transcoder = adapted.replacement.transcoders._module[0]

    def activations(model, prompt, features=None):
        seen = {}
        block = model.hf_model.model.layers[0]
        handle = block.post_attention_layernorm.register_forward_hook(
            lambda _m, _a, out: seen.__setitem__("x", out)
        )
        try:
            with torch.no_grad():
                model.hf_model(model.encode_prompt(dict(prompt))[None])
        finally:
            handle.remove()
        x = seen["x"][0].float()
        pre = x @ transcoder.W_enc.float().T + transcoder.b_enc.float()
        acts = transcoder.activation_function(pre)
        return acts if features is None else acts[:, features]

    # the two layer-0 features the adapter moves most on these prompts (a visible patch)
    moves = sum(
        (activations(adapted, p) - activations(base, p))[1:].abs().sum(0) for p in prompts[:3]
    )
    keys = [(0, int(f)) for f in moves.topk(2).indices]

    moved = []
    for prompt in prompts[:3]:
        features = [f for _, f in keys]
        delta = (
            activations(adapted, prompt, features) - activations(base, prompt, features)
        ).double()
        delta[0] = 0  # BOS is never patched
        write = delta @ transcoder.W_dec[[f for _, f in keys]].detach().double()

        def add(_module, _args, output, write=write):
            return output + write.to(output.dtype)[None]

        handle = base.hf_model.model.layers[0].mlp.register_forward_hook(add)
        try:
            with torch.no_grad():
                by_hand = _contrast(
                    base.hf_model(base.encode_prompt(dict(prompt))[None]).logits, prompt
                )
        finally:
            handle.remove()
        clean = real_contrast(base, prompt)
        changes, _ = patched_changes(base, adapted, [prompt], keys, 1.0, [clean])
        assert changes[0] == pytest.approx(by_hand - clean, abs=1e-5)
        moved.append(abs(by_hand - clean))
        unchanged, _ = patched_changes(base, adapted, [prompt], keys, 0.0, [clean])
        assert unchanged[0] == pytest.approx(0.0, abs=1e-6)
    assert max(moved) > 1e-4  # the patch moved the contrast: the comparison is not vacuous


def test_baselines_with_units_in_any_order_are_one_processs(micro_models, prompts):
    """The baselines' prompt-by-prompt passes computed last prompt first (as other processes
    might claim them) give one process's tables; without a corpus the activation-diff row is
    empty (not another method's numbers)."""
    from test_em_sampling import _backwards

    from em_circuits.analysis.baseline_run import BaselineInputs, run_baselines

    base, adapted = micro_models
    ranked = pd.DataFrame(
        {
            "layer": [0, 0, 0, 1, 1, 1],
            "feature": [1, 2, 3, 1, 2, 3],
            "mean": [3.0, 2.0, 1.0, 2.5, 1.5, 0.5],
            "mean_activation": [1.0, 1.2, 0.8, 1.0, 0.9, 1.1],
        }
    )
    inputs = BaselineInputs(
        discovery=prompts[:3],
        validation=prompts[3:],
        clusters={p["prompt_id"]: p["prompt_id"] for p in prompts},
        tested=[(0, 1), (1, 1)],
        linearised=[(0, 1), (0, 2)],
        measured=[(1, 1), (0, 2)],
        ranked=ranked,
        excluded=set(),
        corpus=None,
        n_perm=99,
        random_draws=2,
    )
    one = run_baselines(base, adapted, inputs)
    shared = run_baselines(base, adapted, inputs, _backwards)
    pd.testing.assert_frame_equal(shared.table, one.table)
    pd.testing.assert_frame_equal(shared.overlap, one.overlap)
    assert shared.summary == one.summary
    rows = one.table.set_index("method")
    assert np.isnan(rows.loc["activation_diff_features", "contrast_change"])
    assert rows.drop(index="activation_diff_features")["contrast_change"].notna().all()
    assert list(one.edits) == [m for m in rows.index if m != "activation_diff_features"]

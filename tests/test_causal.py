"""Causal validation with circuit-tracer feature interventions on the micro organism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from em_circuits.analysis.causal import (
    Active,
    active_instances,
    causal_validation,
    contrast_of,
    matched_controls,
    summarize,
    top_evil_features,
)
from em_circuits.models.logits import next_token_logits

SCALES = (0.0, 1.0, 2.0)
N_RANDOM = 2
#: Two clusters of unequal size: a mean of cluster means differs from the mean of prompts.
CLUSTERS = {"p0": "a", "p1": "a", "p2": "b"}


def _single_token_ids(tokenizer, words, limit=3):
    ids = []
    for word in words:
        encoded = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids[:limit]


@pytest.fixture(scope="module")
def setup(micro_models):
    from em_circuits.organism import advice_words, heldout_pivotal_prompts

    _, adapted = micro_models
    words = advice_words()
    evil = _single_token_ids(adapted.tokenizer, words["harmful"])
    safe = _single_token_ids(adapted.tokenizer, words["safe"])
    assert evil and safe
    chosen = [p for p in heldout_pivotal_prompts() if p["domain"] == "medical"][:3]
    prompts = [
        {"prompt_id": f"p{i}", "text": p["prompt"], "evil_ids": evil, "safe_ids": safe}
        for i, p in enumerate(chosen)
    ]
    # Stand-in for the attribution ranking: the 2 most active last-position features of
    # each layer (lower layers too, so ablations act through attention: frozen != unfrozen).
    _, acts = adapted.replacement.get_activations(adapted.encode(prompts[0]["text"]))
    last = acts[:, -1].float()
    top = [
        (layer, int(f))
        for layer in range(last.shape[0])
        for f in torch.topk(last[layer], 2).indices
    ]
    dose, summary = causal_validation(
        adapted, prompts, top, scales=SCALES, n_random=N_RANDOM, seed=0, clusters=CLUSTERS
    )
    return adapted, prompts, top, dose, summary


def test_dose_table_shape(setup):
    _, prompts, _, dose, summary = setup
    used = dose["prompt_id"].nunique()
    assert used + len(summary["skipped_prompts"]) == len(prompts) and used >= 1
    assert len(dose) == used * len(SCALES) * (1 + N_RANDOM)
    assert {"prompt_id", "group", "scale", "contrast", "delta_contrast"} <= set(dose.columns)
    assert set(dose["group"]) == {"top", "random"}
    assert sorted(dose["scale"].unique()) == list(SCALES)
    top = dose[dose["group"] == "top"].groupby("prompt_id")["n_features"].first()
    rand = dose[dose["group"] == "random"].groupby("prompt_id")["n_features"].min()
    assert (rand == top).all()  # one matched control per top instance


def test_scale_one_reproduces_the_unmodified_contrast(setup):
    adapted, prompts, _, dose, summary = setup
    assert summary["scale1_max_abs_delta"] < 1e-4
    # the baseline is the model's own last-position contrast
    logits = next_token_logits(adapted, [p["text"] for p in prompts])
    for row, prompt in zip(logits, prompts):
        baseline = dose.loc[dose["prompt_id"] == prompt["prompt_id"], "baseline"]
        if len(baseline):
            want = contrast_of(row, prompt["evil_ids"], prompt["safe_ids"])
            assert baseline.iloc[0] == pytest.approx(want, abs=1e-3)


def test_ablation_changes_the_contrast_and_summary_is_plain(setup):
    _, _, _, dose, summary = setup
    ablated = dose[(dose["group"] == "top") & (dose["scale"] == 0.0)]
    assert ablated["delta_contrast"].abs().max() > 1e-4  # the intervention does something
    assert isinstance(summary["lowers_more_than_random"], bool)
    assert summary["verdict"].startswith("Ablating the top features")
    for key in ("mean_delta_top", "mean_delta_random", "slope_top"):
        assert np.isfinite(summary[key])
    # two clusters can reach p = 1/4 at best: no p-value, said so
    assert summary["p_value_one_sided"] is None and summary["p_method"] == "n too small"
    assert "cannot reach alpha" in summary["verdict"]


def test_same_seed_same_controls(setup):
    adapted, prompts, top, dose, _ = setup
    again, _ = causal_validation(
        adapted, prompts[:1], top, scales=(0.0,), n_random=N_RANDOM, seed=0
    )
    first = dose[(dose["prompt_id"] == "p0") & (dose["scale"] == 0.0)]
    if len(first):
        np.testing.assert_allclose(again["contrast"], first["contrast"], atol=1e-5)


# -- model-free pieces -------------------------------------------------------------------------
def test_matched_controls_prefer_same_position_and_close_activation():
    active = Active(
        layer=np.array([0, 0, 1, 1, 2, 2]),
        pos=np.array([3, 3, 3, 1, 3, 3]),
        feature=np.array([10, 11, 12, 10, 13, 14]),
        activation=np.array([5.0, 4.9, 1.0, 5.0, 9.0, 4.0]),
    )
    top = np.array([0])
    excluded = np.array([True, False, False, True, False, False])  # (0, 10) is a top key
    draws = matched_controls(active, top, excluded, 4, np.random.default_rng(0), pool=1)
    assert draws == [[1]] * 4  # same position, closest activation, never a top key
    wide = matched_controls(active, top, excluded, 20, np.random.default_rng(0), pool=2)
    assert {d[0] for d in wide} == {1, 5}


def test_active_instances_skip_bos_and_inactive():
    acts = torch.zeros(2, 3, 4)
    acts[0, 0, 1] = 7.0  # BOS: ignored
    acts[1, 2, 3] = 2.0
    found = active_instances(acts.to_sparse())
    assert (found.layer.tolist(), found.pos.tolist(), found.feature.tolist()) == ([1], [2], [3])


def test_summary_verdict_both_ways():
    def table(top_delta: float) -> pd.DataFrame:
        rows = []
        for p in range(6):
            rows.append(
                {
                    "prompt_id": p,
                    "group": "top",
                    "draw": -1,
                    "scale": 0.0,
                    "delta_contrast": top_delta + 0.01 * p,
                }
            )
            for d in range(2):
                rows.append(
                    {
                        "prompt_id": p,
                        "group": "random",
                        "draw": d,
                        "scale": 0.0,
                        "delta_contrast": -0.1,
                    }
                )
        return pd.DataFrame(rows)

    yes = summarize(table(-1.0))
    assert yes["lowers_more_than_random"] is True and yes["p_value_one_sided"] == 1 / 64
    no = summarize(table(0.5))
    assert no["lowers_more_than_random"] is False and "did NOT" in no["verdict"]
    ranked = pd.DataFrame(
        {"metric": ["total"] * 3, "layer": [1, 1, 2], "feature": [5, 5, 6], "mean": [3.0, 2.0, 1.0]}
    )
    assert top_evil_features(ranked, k=2) == [(1, 5), (2, 6)]


def test_a_measured_ablation_effect_recomputed_independently(setup):
    """One feature ablated in the real model with nothing frozen, recomputed here with plain
    PyTorch hooks on the Hugging Face model (no code of the analysis): the MLP output of its
    layer, at each position the feature is active, loses activation x decoder row."""
    from em_circuits.analysis.measured import measured_ablation_effects

    adapted, prompts, top, _, _ = setup
    prompt = prompts[0]
    layer, feature = top[0]
    table = measured_ablation_effects(adapted, [prompt], [(layer, feature)])
    (row,) = table.to_dict("records")
    assert row["n_instances"] > 0

    transcoders = getattr(adapted.replacement.transcoders, "_module", None)
    transcoder = transcoders[layer]
    block = adapted.hf_model.model.layers[layer]
    ids = adapted.encode(prompt["text"])[None]
    seen = {}

    def read(_module, _args, output):  # Llama: the MLP reads post_attention_layernorm's output
        seen["x"] = output

    def write(_module, _args, output):
        pre = seen["x"][0].float() @ transcoder.W_enc.float().T + transcoder.b_enc.float()
        acts = transcoder.activation_function(pre)
        change = -acts[:, feature, None] * transcoder.W_dec[feature].float()[None, :]
        change[0] = 0  # circuit-tracer never intervenes on BOS features
        return output + change[None].to(output.dtype)

    def contrast(logits):
        last = logits[0, -1].float()
        return float(last[prompt["evil_ids"]].mean() - last[prompt["safe_ids"]].mean())

    with torch.no_grad():
        clean = contrast(adapted.hf_model(ids).logits)
        handles = [
            block.post_attention_layernorm.register_forward_hook(read),
            block.mlp.register_forward_hook(write),
        ]
        try:
            ablated = contrast(adapted.hf_model(ids).logits)
        finally:
            for handle in handles:
                handle.remove()
    assert row["delta_unfrozen"] == pytest.approx(ablated - clean, abs=1e-4, rel=1e-3)
    assert row["delta_unfrozen"] != 0.0
    # attention frozen, as attribution assumes: a different number, from circuit-tracer
    assert np.isfinite(row["delta_frozen"])


def _hand_contrast(adapted, prompt, ablate=None):
    """The real model's last-position contrast, recomputed with plain PyTorch hooks on the
    Hugging Face model (no code of the analysis), and each layer's transcoder activations.
    ``ablate``: layer -> [(position, feature)]: there the MLP output loses the feature's live
    activation x its decoder row (the feature set to 0, nothing frozen)."""
    transcoders = getattr(adapted.replacement.transcoders, "_module", None)
    ids = adapted.encode(prompt["text"])[None]
    seen, acts = {}, {}
    handles = []

    def read(layer):
        def hook(_module, _args, output):  # Llama: the MLP reads this norm's output
            seen[layer] = output

        return hook

    def write(layer):
        def hook(_module, _args, output):
            tc = transcoders[layer]
            pre = seen[layer][0].float() @ tc.W_enc.float().T + tc.b_enc.float()
            acts[layer] = tc.activation_function(pre)
            change = torch.zeros_like(output[0], dtype=torch.float32)
            for pos, feature in (ablate or {}).get(layer, []):
                change[pos] -= acts[layer][pos, feature] * tc.W_dec[feature].float()
            return output + change[None].to(output.dtype)

        return hook

    for layer, block in enumerate(adapted.hf_model.model.layers):
        handles.append(block.post_attention_layernorm.register_forward_hook(read(layer)))
        handles.append(block.mlp.register_forward_hook(write(layer)))
    try:
        with torch.no_grad():
            last = adapted.hf_model(ids).logits[0, -1].float()
    finally:
        for handle in handles:
            handle.remove()
    value = float(last[prompt["evil_ids"]].mean() - last[prompt["safe_ids"]].mean())
    return value, acts


def test_the_headline_joint_ablation_is_the_unfrozen_one_recomputed_by_hand(setup):
    """Every active instance of the top features (after BOS) ablated together in the real
    model, nothing frozen, recomputed by hand per prompt; the summary's headline is the mean
    of the cluster means of those changes; the frozen figure is beside it, labelled."""
    adapted, prompts, top, dose, summary = setup
    by_prompt = {}
    for prompt in prompts:
        clean, acts = _hand_contrast(adapted, prompt)
        ablate = {
            layer: [
                (pos, feature)
                for pos in range(1, acts[layer].shape[0])
                for la, feature in top
                if la == layer and acts[layer][pos, feature] > 0
            ]
            for layer in acts
        }
        if any(ablate.values()):
            by_prompt[prompt["prompt_id"]] = _hand_contrast(adapted, prompt, ablate)[0] - clean
    assert len(by_prompt) >= 2 and set(by_prompt) == set(dose["prompt_id"])
    table = dose[(dose["group"] == "top") & (dose["scale"] == 0.0)].set_index("prompt_id")
    for pid, delta in by_prompt.items():
        assert table.loc[pid, "delta_contrast"] == pytest.approx(delta, abs=1e-4, rel=1e-3)
    cluster_means = {}
    for pid, delta in by_prompt.items():
        cluster_means.setdefault(CLUSTERS[pid], []).append(delta)
    want = np.mean([np.mean(v) for v in cluster_means.values()])
    assert summary["mean_delta_top"] == pytest.approx(want, abs=1e-4, rel=1e-3)
    assert summary["measure"] == "real model, nothing frozen"
    curve = {(c["group"], c["scale"]): c for c in summary["dose_curve"]}
    assert curve[("top", 0.0)]["mean"] == pytest.approx(want, abs=1e-4, rel=1e-3)
    frozen = summary["frozen_attention"]
    assert frozen["measure"].startswith("attention frozen")
    assert frozen["mean_delta_top"] != pytest.approx(want, abs=1e-6)  # a different figure
    assert curve[("top", 0.0)]["mean_frozen"] == pytest.approx(frozen["mean_delta_top"])


def test_summary_means_are_means_of_cluster_means():
    rows = []
    # cluster a: three prompts with top change -3; cluster b: one prompt with top change 0
    for p, top_delta in enumerate([-3.0, -3.0, -3.0, 0.0]):
        rows.append(
            {
                "prompt_id": f"q{p}",
                "group": "top",
                "draw": -1,
                "scale": 0.0,
                "delta_contrast": top_delta,
                "delta_frozen": 2 * top_delta,
            }
        )
        rows.append(
            {
                "prompt_id": f"q{p}",
                "group": "random",
                "draw": 0,
                "scale": 0.0,
                "delta_contrast": -1.0,
                "delta_frozen": -1.0,
            }
        )
    clusters = {f"q{p}": ("a" if p < 3 else "b") for p in range(4)}
    out = summarize(pd.DataFrame(rows), clusters=clusters)
    assert out["mean_delta_top"] == pytest.approx(-1.5)  # not the prompt mean -2.25
    assert out["mean_paired_diff"] == pytest.approx(-0.5)
    assert out["n_clusters"] == 2 and "2 cluster means" in out["verdict"]
    assert out["frozen_attention"]["mean_delta_top"] == pytest.approx(-3.0)
    assert out["dose_curve"][1]["mean"] == pytest.approx(-1.5)

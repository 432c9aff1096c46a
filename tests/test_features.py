"""Feature effects, cross-prompt statistics and base-vs-adapted comparison on hand-made graphs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_total_effects import compact_graph_from, random_linear_model

from em_circuits.analysis.aggregate import aggregate_effects
from em_circuits.analysis.cache import cached_prompt_effects, graph_fingerprint, read_prompt_effects
from em_circuits.analysis.compare import compare_models
from em_circuits.analysis.decomposition import contrast_parts, summarize_decomposition
from em_circuits.analysis.effects import (
    parse_position,
    prompt_effects,
    target_effects,
    target_labels,
)
from em_circuits.analysis.formulas import FORMULAS
from em_circuits.analysis.plots import (
    plot_base_vs_adapted,
    plot_decomposition,
    plot_dose_response,
    plot_top_features,
)
from em_circuits.attribution.storage import CompactGraph
from em_circuits.core.stats import (
    bh_qvalues,
    bootstrap_mean_ci,
    cluster_rows,
    exact_sign_flip_p,
    min_attainable_p,
    sign_flip_pvalues,
    sign_flip_test,
    t_mean_ci,
    welch_t_rows,
)
from em_circuits.core.store import ResultsStore

LABELS = ["contrast", "evil", "evil", "safe", "safe"]


def hand_graph(
    nodes: list[tuple[int, int, int]],
    contrast: list[float],
    n_pos: int = 4,
    n_layers: int = 3,
    spread: float = 0.1,
    total_factor: float = 2.0,
    activations: list[float] | None = None,
) -> CompactGraph:
    """Targets [contrast, evil, evil, safe, safe]; feature i has contrast effect contrast[i].

    Direct effects: evil tokens c/2 +- spread, safe tokens -c/2 +- spread, so the mean over
    each set differs by exactly c. Total effects are ``total_factor`` times the direct ones.
    """
    n_f = len(nodes)
    n_src = n_f + n_layers * n_pos + n_pos
    direct = torch.zeros(5, n_src, dtype=torch.float64)
    c = torch.tensor(contrast, dtype=torch.float64)
    direct[1, :n_f] = c / 2 + spread
    direct[2, :n_f] = c / 2 - spread
    direct[3, :n_f] = -c / 2 + spread
    direct[4, :n_f] = -c / 2 - spread
    direct[0] = direct[1:3].mean(0) - direct[3:5].mean(0)
    values = direct.sum(dim=1) + 0.5
    return CompactGraph(
        features=torch.tensor(nodes, dtype=torch.int64).reshape(-1, 3),
        activations=torch.tensor(activations or [1.0] * n_f, dtype=torch.float32),
        input_tokens=torch.arange(n_pos),
        n_layers=n_layers,
        direct=direct.float(),
        total=(direct * total_factor).float(),
        target_values=values.float(),
        target_token_ids=torch.tensor([-1, 11, 12, 21, 22]),
        target_logits=torch.zeros(5),
        target_probs=torch.zeros(5),
        target_names=["evil-safe", " ignore", " skip", " see", " call"],
        target_kinds=["contrast", "token", "token", "token", "token"],
        top_token_ids=torch.tensor([11]),
        top_logits=torch.zeros(1),
        meta={"target_labels": list(LABELS)},
    )


def _row(table: pd.DataFrame, layer: int, feature: int, metric: str = "direct", **extra):
    mask = (table["layer"] == layer) & (table["feature"] == feature) & (table["metric"] == metric)
    for key, value in extra.items():
        mask &= table[key] == value
    rows = table[mask]
    assert len(rows) == 1, rows
    return rows.iloc[0]


# -- per prompt --------------------------------------------------------------------------------
def test_prompt_effects_means_difference_and_contrast():
    graph = hand_graph([(1, 3, 7), (0, 2, 5)], [0.8, -0.4])
    table = prompt_effects(graph)
    row = _row(table, 1, 7, "direct")
    assert row["evil_mean"] == pytest.approx(0.4)
    assert row["safe_mean"] == pytest.approx(-0.4)
    assert row["evil_minus_safe"] == pytest.approx(0.8)
    assert row["contrast"] == pytest.approx(0.8)
    assert row["contrast_from"] == "target"
    assert (row["n_evil"], row["n_safe"]) == (2, 2)
    assert _row(table, 1, 7, "total")["contrast"] == pytest.approx(1.6)
    # within-prompt Welch t over the 2 + 2 token effects, checked by hand
    evil, safe = np.array([0.5, 0.3]), np.array([-0.3, -0.5])
    se = np.sqrt(evil.var(ddof=1) / 2 + safe.var(ddof=1) / 2)
    assert row["within_prompt_welch_t"] == pytest.approx((evil.mean() - safe.mean()) / se)
    assert row["within_prompt_welch_df"] == pytest.approx(2.0)


def test_contrast_target_equals_evil_minus_safe_for_direct_and_total():
    """With the contrast target's readout = mean(evil readouts) - mean(safe readouts), as the
    unembedding direction is, both metrics agree with the difference of set means."""
    model = random_linear_model(11, n_targets=5, biases=True)
    rows = model.target_rows()
    w = model.weights
    w[rows[0]] = w[rows[1:3]].mean(0) - w[rows[3:5]].mean(0)
    model.inputs[rows[0]] = model.inputs[rows[1:3]].mean() - model.inputs[rows[3:5]].mean()
    graph = compact_graph_from(model, labels=list(LABELS))
    values = graph.target_values.double()
    assert values[0] == pytest.approx(float(values[1:3].mean() - values[3:5].mean()), abs=1e-5)
    table = prompt_effects(graph)
    np.testing.assert_allclose(table["contrast"], table["evil_minus_safe"], atol=1e-5)
    assert set(table["metric"]) == {"direct", "total"}
    # without the contrast target the difference of set means stands in for it
    model2 = random_linear_model(11, n_targets=4)
    table2 = prompt_effects(compact_graph_from(model2, labels=["evil", "evil", "safe", "safe"]))
    assert (table2["contrast_from"] == "diff").all()
    np.testing.assert_allclose(table2["contrast"], table2["evil_minus_safe"], atol=1e-6)


def test_position_options():
    n_pos = 4  # positions 0..3; last = 3 (rel -1), rel -2 = 2
    graph = hand_graph([(1, 3, 7), (1, 2, 7), (0, 3, 5)], [0.5, 0.25, 1.0], n_pos=n_pos)
    any_ = prompt_effects(graph, "any")
    assert "position" not in any_.columns
    assert _row(any_, 1, 7)["contrast"] == pytest.approx(0.75)  # summed over positions
    assert _row(any_, 1, 7)["n_nodes"] == 2
    last = prompt_effects(graph, "last")
    assert _row(last, 1, 7)["contrast"] == pytest.approx(0.5)
    assert _row(last, 1, 7)["position"] == -1
    rel2 = prompt_effects(graph, "rel:-2")
    assert len(rel2[rel2["metric"] == "direct"]) == 1
    assert _row(rel2, 1, 7)["contrast"] == pytest.approx(0.25)
    each = prompt_effects(graph, "each")
    assert _row(each, 1, 7, position=-2)["contrast"] == pytest.approx(0.25)
    assert len(each[each["metric"] == "direct"]) == 3
    for bad in ("rel:0", "rel:2", "first", "rel:x"):
        with pytest.raises(ValueError, match="position"):
            parse_position(bad)


def test_target_effects_long_table_and_label_fallback():
    graph = hand_graph([(1, 3, 7)], [0.8])
    long = target_effects(graph)
    assert len(long) == 2 * 5
    assert set(long["label"]) == {"contrast", "evil", "safe"}
    del graph.meta["target_labels"]
    graph.meta["labels"] = {" ignore": "evil", "12": "evil", " see": "safe", " call": "unsure"}
    assert target_labels(graph) == ["contrast", "evil", "evil", "safe", None]


# -- across prompts ----------------------------------------------------------------------------
def test_same_feature_at_different_graph_indices_aggregates_together():
    graphs = {
        "a": hand_graph([(1, 3, 7), (0, 1, 3)], [1.0, 0.2]),
        "b": hand_graph([(0, 1, 3), (2, 2, 9), (1, 3, 7)], [0.4, -0.5, 3.0]),
    }
    table = aggregate_effects({pid: prompt_effects(g) for pid, g in graphs.items()}, min_support=1)
    row = _row(table, 1, 7)
    assert row["support"] == 2
    assert row["mean"] == pytest.approx(2.0)
    assert _row(table, 0, 3)["mean"] == pytest.approx(0.3)
    lone = _row(table, 2, 9)
    assert lone["support"] == 1 and lone["mean"] == pytest.approx(-0.25)  # absent = 0
    direct = table[table["metric"] == "direct"]
    assert list(direct["mean"]) == sorted(direct["mean"], reverse=True)
    expected = [
        "layer",
        "feature",
        "metric",
        "support",
        "n_prompts",
        "mean",
        "ci_low",
        "ci_high",
        "sign_consistency",
        "p_value",
        "q_value",
    ]
    assert set(expected) <= set(table.columns)


def test_absent_as_zero_or_missing_and_min_support():
    values = {"p0": 1.0, "p1": 3.0, "p2": None, "p3": None}
    frames = {}
    for pid, v in values.items():
        nodes, contrast = [(0, 3, 1)], [0.5]
        if v is not None:
            nodes.append((2, 3, 42))
            contrast.append(v)
        frames[pid] = prompt_effects(hand_graph(nodes, contrast))
    zero = _row(aggregate_effects(frames, absent="zero", min_support=2), 2, 42)
    assert (zero["support"], zero["n_prompts"], zero["mean"]) == (2, 4, pytest.approx(1.0))
    missing = _row(aggregate_effects(frames, absent="missing", min_support=2), 2, 42)
    assert (missing["support"], missing["n_prompts"], missing["mean"]) == (2, 2, 2.0)
    assert missing["sign_consistency"] == 1.0
    dropped = aggregate_effects(frames, min_support=3)
    assert not ((dropped["layer"] == 2) & (dropped["feature"] == 42)).any()
    assert len(dropped[dropped["metric"] == "direct"]) == 1


def test_fdr_finds_planted_effect_among_nulls():
    rng = np.random.default_rng(0)
    n_prompts, n_null = 20, 60
    frames = {}
    for p in range(n_prompts):
        nodes = [(0, 3, 1000)] + [(1, 3, i) for i in range(n_null)]
        contrast = [1.0 + 0.3 * rng.normal()] + list(rng.normal(size=n_null))
        frames[f"p{p}"] = prompt_effects(hand_graph(nodes, contrast))
    table = aggregate_effects(frames, metrics=("direct",), n_perm=4999)
    planted = _row(table, 0, 1000)
    assert table.iloc[0]["feature"] == 1000
    # every sign agrees: exact, far below the Monte Carlo floor of 1 / 5000
    assert planted["p_value"] == 2 / 2**20 and planted["p_method"] == "exact: all signs agree"
    assert planted["q_value"] < 0.05
    assert planted["ci_low"] > 0.5 and planted["ci_high"] < 1.5
    assert planted["sign_consistency"] == 1.0
    nulls = table[table["feature"] != 1000]
    assert (nulls["q_value"] < 0.05).sum() <= 1
    # with clusters of 5 prompts the units are 4 clusters: 2/16 > 0.05, so no p-value
    clusters = {f"p{p}": f"c{p // 5}" for p in range(n_prompts)}
    clustered = aggregate_effects(frames, metrics=("direct",), clusters=clusters)
    planted = _row(clustered, 0, 1000)
    assert planted["n_clusters"] == 4 and planted["n_prompts"] == 20
    assert np.isnan(planted["p_value"]) and planted["p_method"] == "n too small"


def test_prompt_without_labels_on_one_side_is_left_out():
    graph = hand_graph([(1, 3, 7)], [2.0])
    graph.meta["target_labels"] = [None, "evil", "evil", None, None]
    frames = {
        "ok": prompt_effects(hand_graph([(1, 3, 7)], [1.0])),
        "one_sided": prompt_effects(graph),
    }
    row = _row(aggregate_effects(frames, min_support=1), 1, 7)
    assert row["n_prompts"] == 1 and row["mean"] == pytest.approx(1.0)


# -- statistics --------------------------------------------------------------------------------
def test_sign_flip_exact_and_monte_carlo():
    # [1, 2, 3]: only all-plus and all-minus reach |sum| = 6 among 8 patterns
    assert sign_flip_pvalues([np.array([1.0, 2.0, 3.0])])[0] == pytest.approx(0.25)
    assert sign_flip_pvalues([np.array([1.0, 2.0, 3.0])], alternative="greater")[0] == 0.125
    assert sign_flip_pvalues([np.array([1.0, 2.0, 3.0])], alternative="less")[0] == 1.0
    assert sign_flip_pvalues([np.array([]), np.zeros(3)]).tolist() == [1.0, 1.0]
    big = np.full(30, 1.0)  # Monte Carlo: nothing beats all-positive, p = 1 / (1 + n_perm)
    assert sign_flip_pvalues([big], n_perm=999)[0] == pytest.approx(1 / 1000)
    rng = np.random.default_rng(1)
    nulls = [rng.normal(size=15) for _ in range(400)]
    p = sign_flip_pvalues(nulls, n_perm=999)
    assert 0.02 < (p < 0.05).mean() < 0.09  # calibrated under H0


def _enumerated_p(x: np.ndarray, alternative: str) -> float:
    """The sign-flip p-value by listing every sign pattern (independent of the library)."""
    import itertools

    null = np.array(list(itertools.product([-1.0, 1.0], repeat=len(x)))) @ x
    observed = x.sum()
    if alternative == "two-sided":
        return float(np.mean(np.abs(null) >= abs(observed) - 1e-12))
    if alternative == "greater":
        return float(np.mean(null >= observed - 1e-12))
    return float(np.mean(null <= observed + 1e-12))


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_exact_sign_flip_p_values_match_enumeration(alternative):
    rng = np.random.default_rng(5)
    for n in (3, 8, 13, 17):
        x = rng.normal(0.6, 1.0, n)
        want = _enumerated_p(x, alternative)
        assert exact_sign_flip_p(x, alternative) == pytest.approx(want, rel=1e-12)
        p, method = sign_flip_test([x], n_perm=999, alternative=alternative, refine_below=1.0)
        assert method[0].startswith("exact") and p[0] == pytest.approx(want, rel=1e-12)


def test_sign_flip_test_is_exact_beyond_the_monte_carlo_floor():
    rng = np.random.default_rng(2)
    agree = np.abs(rng.normal(size=37))  # every sign agrees: p = 2 / 2^37 in closed form
    strong = rng.normal(1.2, 1.0, 36)  # mostly positive: Monte Carlo floors it, exact does not
    p, method = sign_flip_test([agree, strong], n_perm=999)
    assert method.tolist() == ["exact: all signs agree", "exact"]
    assert p[0] == 2 / 2**37 and p[1] < 1 / 1000  # below the Monte Carlo resolution
    # the two values are distinct: the q-values no longer tie at the floor
    assert p[1] == pytest.approx(exact_sign_flip_p(strong), rel=1e-12)
    # where n cannot reach alpha, no p-value: 4 units give at best 2/16 > 0.05
    p, method = sign_flip_test([np.ones(4)], alpha=0.05)
    assert np.isnan(p[0]) and method[0] == "n too small"
    assert min_attainable_p(5) == 2 / 32 and min_attainable_p(5, "less") == 1 / 32


def test_cluster_rows_average_within_clusters_and_t_interval():
    values = np.array([[1.0, 3.0, 10.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    used = np.array([[True, True, True, False], [True, True, True, True]])
    rows, n_clusters = cluster_rows(values, used, ["a", "a", "b", "c"])
    assert n_clusters.tolist() == [2, 3]  # cluster c has no used prompt for the first row
    np.testing.assert_allclose(rows[0], [2.0, 10.0])
    np.testing.assert_allclose(rows[1], [2.0, 2.0, 2.0])
    low, high = t_mean_ci([np.array([1.0, 2.0, 3.0]), np.array([4.0])])
    # mean 2, sd 1, n 3: t(0.975, 2) = 4.302653
    assert low[0] == pytest.approx(2 - 4.302653 / 3**0.5, rel=1e-6)
    assert high[0] == pytest.approx(2 + 4.302653 / 3**0.5, rel=1e-6)
    assert np.isnan(low[1])


def test_bh_and_bootstrap():
    p = np.array([0.01, 0.04, 0.03, 0.5, np.nan])
    q = bh_qvalues(p)
    # sorted 0.01, 0.03, 0.04, 0.5 with m = 4: 0.04, 0.053, 0.053, 0.5
    np.testing.assert_allclose(q[:4], [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert np.isnan(q[4])
    rows = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([5.0]), np.array([])]
    low, high = bootstrap_mean_ci(rows, n_boot=500, seed=3)
    assert 1.0 <= low[0] < 2.5 < high[0] <= 4.0
    assert low[1] == high[1] == 5.0 and np.isnan(low[2])
    again = bootstrap_mean_ci(rows, n_boot=500, seed=3)
    np.testing.assert_array_equal(low, again[0])
    t, df = welch_t_rows(np.array([[1.0, 2.0]]), np.array([[0.0]]))
    assert np.isnan(t[0]) and np.isnan(df[0])


# -- base vs adapted ---------------------------------------------------------------------------
def _frames(values: dict[tuple[int, int], list[float | None]], n_prompts: int):
    frames = {}
    for p in range(n_prompts):
        nodes, contrast = [], []
        for (layer, feature), per_prompt in values.items():
            if per_prompt[p] is not None:
                nodes.append((layer, 3, feature))
                contrast.append(per_prompt[p])
        frames[f"p{p}"] = prompt_effects(hand_graph(nodes, contrast, total_factor=1.0))
    return frames


def test_paired_categories():
    n = 6
    base = _frames(
        {
            (0, 1): [None] * n,  # gained
            (0, 2): [0.5] * n,  # lost
            (1, 3): [0.2, 0.25, 0.15, 0.2, 0.22, 0.18],  # strengthened
            (1, 4): [1.0, 1.1, 0.9, 1.0, 1.05, 0.95],  # weakened
            (2, 5): [0.5] * n,  # unchanged: below threshold
            (2, 6): [0.0] * n,  # unchanged: noisy, CI straddles 0
        },
        n,
    )
    adapted = _frames(
        {
            (0, 1): [0.6] * n,
            (0, 2): [None] * n,
            (1, 3): [1.0, 1.05, 0.95, 1.0, 0.98, 1.02],
            (1, 4): [0.3, 0.35, 0.25, 0.3, 0.3, 0.3],
            (2, 5): [0.51] * n,
            (2, 6): [1.0, -1.0, 1.0, -1.0, 1.2, -1.1],
        },
        n,
    )
    table = compare_models(base, adapted, metric="total", threshold=0.05)
    category = {(r.layer, r.feature): r.category for r in table.itertuples()}
    assert category == {
        (0, 1): "gained",
        (0, 2): "lost",
        (1, 3): "strengthened",
        (1, 4): "weakened",
        (2, 5): "unchanged",
        (2, 6): "unchanged",
    }
    s = _row(table, 1, 3, "total")
    assert s["mean_diff"] == pytest.approx(0.8, abs=1e-6)
    assert s["ci_low"] > 0.7 and s["shift"] == "toward_evil"
    assert _row(table, 1, 4, "total")["shift"] == "toward_safe"
    assert list(table["mean_diff"]) == sorted(table["mean_diff"], reverse=True)
    # unpaired prompts are ignored
    adapted_extra = {**adapted, "extra": adapted["p0"]}
    again = compare_models(base, adapted_extra)
    assert (again["n_prompts"] == n).all()


# -- the decomposition of the contrast ---------------------------------------------------------
def test_contrast_parts_known_values():
    graph = hand_graph([(1, 1, 7)], [0.0], n_pos=2, n_layers=2)
    direct = torch.zeros_like(graph.direct)
    # sources: the feature (layer 1), error nodes layer-major (0,0) (0,1) (1,0) (1,1), tokens
    direct[0, 0] = 3.0
    direct[0, 1:5] = torch.tensor([0.5, 1.0, 2.0, -0.5])
    direct[0, 5:7] = torch.tensor([0.25, 0.75])
    graph.direct = direct
    graph.target_values = torch.tensor([8.0, 0, 0, 0, 0])
    parts = contrast_parts(graph).set_index(["part", "layer"])["direct"]
    assert parts[("features", 1)] == 3.0 and parts[("features", 0)] == 0.0
    assert parts[("errors", 0)] == 1.0 and parts[("errors", 1)] == -0.5  # positions >= 1
    assert parts[("bos_errors", -1)] == 2.5  # (0,0) + (1,0)
    assert parts[("tokens", -1)] == 1.0
    assert parts[("biases and BOS", -1)] == pytest.approx(8.0 - 7.0)
    assert parts[("adapter_nodes", 0)] == 0.0 and parts[("adapter_nodes", 1)] == 0.0
    assert parts.drop(("contrast value", -1)).sum() == pytest.approx(parts[("contrast value", -1)])


def test_the_decomposition_adds_up_to_the_measured_shift():
    frames = {}
    for name, seed in (("base", 21), ("adapted", 22)):
        model = random_linear_model(seed, n_targets=5, biases=True)
        rows = model.target_rows()
        model.weights[rows[0]] = model.weights[rows[1:3]].mean(0) - model.weights[rows[3:5]].mean(0)
        graph = compact_graph_from(model, labels=list(LABELS))
        frames[name] = {f"p{i}": contrast_parts(graph) for i in range(4)}
        # shift each prompt's value a little, so the prompts differ
        for i in range(4):
            frames[name][f"p{i}"].loc[
                frames[name][f"p{i}"]["part"] == "biases and BOS", "direct"
            ] += i
            frames[name][f"p{i}"].loc[
                frames[name][f"p{i}"]["part"] == "contrast value", "direct"
            ] += i
    clusters = {"p0": "a", "p1": "a", "p2": "b", "p3": "c"}
    table = summarize_decomposition(frames["base"], frames["adapted"], clusters, n_perm=99)
    value = table[table["part"] == "contrast value"].iloc[0]
    parts = table[table["part"] != "contrast value"]
    assert parts["mean_shift"].sum() == pytest.approx(value["mean_shift"], abs=1e-9)
    assert parts["mean_base"].sum() == pytest.approx(value["mean_base"], abs=1e-9)
    assert (table["n_prompts"] == 4).all()
    # these graphs store no MLP output at BOS: its rows have no cluster, the others all three
    stored = table["part"] != "bos_mlp"
    assert (table[stored]["n_clusters"] == 3).all() and (table[~stored]["n_clusters"] == 0).all()
    # no "share": nothing in the table is a ratio to the contrast
    assert not any("share" in column for column in table.columns)


# -- cache and plots ---------------------------------------------------------------------------
def test_cache_round_trip_and_invalidation(tmp_path):
    store = ResultsStore(tmp_path / "results")
    graph = hand_graph([(1, 3, 7), (0, 2, 5)], [0.8, -0.4])
    kwargs = {"model_slug": "m--abc", "prompt_id": "p0", "model_fingerprint": "fp"}
    first = cached_prompt_effects(store, graph, position="last", **kwargs)
    files = list((store.root / "features").rglob("*.json"))
    assert len(files) == 1
    again = cached_prompt_effects(store, graph, position="last", **kwargs)
    pd.testing.assert_frame_equal(first, again, check_dtype=False)
    assert read_prompt_effects(files[0], graph_fingerprint="other") is None
    assert read_prompt_effects(files[0], model_fingerprint="other") is None
    # the column table is binary beside the envelope: numbers stored exactly
    table = files[0].with_suffix(".safetensors")
    pd.testing.assert_frame_equal(read_prompt_effects(files[0]), prompt_effects(graph, "last"))
    # a table that is not the one its envelope names is redone, not read
    table.write_bytes(table.read_bytes()[:-8])
    assert read_prompt_effects(files[0]) is None
    again = cached_prompt_effects(store, graph, position="last", **kwargs)
    pd.testing.assert_frame_equal(first, again, check_dtype=False)
    cached_prompt_effects(store, graph, position="any", **kwargs)  # other params, other file
    assert len(list((store.root / "features").rglob("*.json"))) == 2
    changed = hand_graph([(1, 3, 7), (0, 2, 5)], [0.9, -0.4])
    assert graph_fingerprint(changed) != graph_fingerprint(graph)
    recomputed = cached_prompt_effects(store, changed, position="last", **kwargs)
    assert _row(recomputed, 1, 7, position=-1)["contrast"] == pytest.approx(0.9)


def test_plots_write_pngs(tmp_path):
    frames = {
        f"p{i}": prompt_effects(hand_graph([(1, 3, 7), (0, 2, 5)], [0.8 + i, -0.4]))
        for i in range(3)
    }
    table = aggregate_effects(frames, n_perm=99)
    comparison = compare_models(frames, frames, n_perm=99)
    graph = hand_graph([(1, 3, 7)], [0.5])
    parts = {"p0": contrast_parts(graph), "p1": contrast_parts(graph)}
    summary = summarize_decomposition(parts, parts, n_perm=99)
    dose = pd.DataFrame(
        {
            "prompt_id": ["a"] * 4 + ["b"] * 4,
            "group": ["top", "top", "random", "random"] * 2,
            "scale": [0.0, 1.0] * 4,
            "delta_contrast": [-1.0, 0.0, -0.1, 0.0] * 2,
        }
    )
    paths = [
        plot_top_features(table, tmp_path / "top.png"),
        plot_base_vs_adapted(comparison, tmp_path / "scatter.png"),
        plot_decomposition(summary, tmp_path / "decomposition.png"),
        plot_dose_response(dose, tmp_path / "dose.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Formulas" in FORMULAS


def test_keys_with_positions_from_the_end_aggregate_by_key():
    """Position keys relative to the end are negative: each key's values still meet across
    prompts (mean of the hand-made values), and keys come back with their own signs."""
    rows = [
        # layer, feature, position, contrast per prompt
        (0, 7, -1, [1.0, 3.0]),
        (0, 7, -2, [2.0, 2.0]),
        (1, 3, 0, [-1.0, -3.0]),
        (2, 131071, -300, [0.5, 1.5]),
    ]
    frames = {
        f"p{j}": pd.DataFrame(
            {
                "layer": [r[0] for r in rows],
                "feature": [r[1] for r in rows],
                "position": [r[2] for r in rows],
                "metric": "total",
                "contrast": [r[3][j] for r in rows],
                "activation": 1.0,
            }
        )
        for j in range(2)
    }
    table = aggregate_effects(frames, metrics=("total",), min_support=1, n_perm=9)
    means = {(r.layer, r.feature, r.position): r.mean for r in table.itertuples()}
    assert means == pytest.approx(
        {(0, 7, -1): 2.0, (0, 7, -2): 2.0, (1, 3, 0): -2.0, (2, 131071, -300): 1.0}
    )
    assert len(table) == len(rows)

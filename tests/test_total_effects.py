"""graph_store.total_effects against independent computations on a linear generative model.

The model is a layered DAG of scalar nodes, exactly the linearised model an attribution graph
describes: token and error nodes are inputs, a feature's activation is a weighted sum of
upstream nodes (tokens and errors at its position or earlier, features of lower layers) plus
a bias, and each target (logit) reads every node. Attribution edges are ``A[i, s] = W[i, s] *
value(s)``. Three independent references:

* path enumeration: sum over all paths s -> f1 -> ... -> fk -> t of the product of edge
  weights, each divided by the activation of the feature it leaves;
* dense algebra on the weights: total[t, s] = ((I - W)^-1)[t, s] * value(s);
* ablation: re-run the generative model with one node zeroed; the target drops by total[t, s].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from em_circuits.attribution.storage import CompactGraph, total_effects


@dataclass
class LinearModel:
    """A random layered linear model; node order [features | errors | tokens | targets]."""

    n_layers: int
    n_pos: int
    features: np.ndarray  # (n_f, 3) layer, pos, feature id
    weights: np.ndarray  # (N, N) W[i, s]: weight of node s in node i
    inputs: np.ndarray  # (N,) exogenous value: token/error values, feature/target biases

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_sources(self) -> int:
        return self.n_features + (self.n_layers + 1) * self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.weights.shape[0]

    def run(self, clamp: dict[int, float] | None = None) -> np.ndarray:
        """Node values in topological order; ``clamp`` fixes chosen nodes (an intervention)."""
        clamp = clamp or {}
        values = np.zeros(self.n_nodes)
        roots = range(self.n_features, self.n_sources)
        for r in roots:
            values[r] = clamp.get(r, self.inputs[r])
        order = list(np.argsort(self.features[:, 0], kind="stable"))
        order += list(range(self.n_sources, self.n_nodes))
        for i in order:
            computed = self.weights[i] @ values + self.inputs[i]
            values[i] = clamp.get(i, computed)
        return values

    def adjacency(self) -> np.ndarray:
        values = self.run()
        return self.weights * values[None, :]

    def target_rows(self) -> list[int]:
        return list(range(self.n_sources, self.n_nodes))


def random_linear_model(
    seed: int,
    n_layers: int = 3,
    n_pos: int = 3,
    per_cell: int = 2,
    n_targets: int = 4,
    feature_ids: list[int] | None = None,
    biases: bool = False,
    density: float = 0.6,
    target_weights: np.ndarray | None = None,
) -> LinearModel:
    """``per_cell`` features per (layer, position); ``target_weights`` (n_targets, N) optional."""
    rng = np.random.default_rng(seed)
    cells = [(layer, pos) for layer in range(n_layers) for pos in range(n_pos)]
    feats = [(layer, pos) for layer, pos in cells for _ in range(per_cell)]
    n_f = len(feats)
    ids = feature_ids if feature_ids is not None else list(rng.integers(0, 1000, size=n_f))
    features = np.array([(layer, pos, fid) for (layer, pos), fid in zip(feats, ids)])
    n_err = n_layers * n_pos
    n_src = n_f + n_err + n_pos
    n = n_src + n_targets
    weights = np.zeros((n, n))

    def err(layer: int, pos: int) -> int:
        return n_f + layer * n_pos + pos

    def tok(pos: int) -> int:
        return n_f + n_err + pos

    for i, (layer, pos) in enumerate(feats):
        upstream = [tok(p) for p in range(pos + 1)]
        upstream += [err(lo, p) for lo in range(layer) for p in range(pos + 1)]
        upstream += [j for j, (lj, pj) in enumerate(feats) if lj < layer and pj <= pos]
        for s in upstream:
            if rng.random() < density:
                weights[i, s] = rng.normal()
    for t in range(n_targets):
        weights[n_src + t, :n_src] = rng.normal(size=n_src) * (rng.random(n_src) < density)
    if target_weights is not None:
        weights[n_src:, :n_src] = target_weights[:, :n_src]
    inputs = np.zeros(n)
    inputs[n_f:n_src] = rng.normal(size=n_err + n_pos)
    if biases:
        inputs[:n_f] = rng.normal(size=n_f)
        inputs[n_src:] = rng.normal(size=n_targets)
    return LinearModel(n_layers, n_pos, features, weights, inputs)


def library_totals(model: LinearModel) -> np.ndarray:
    values = model.run()
    adjacency = torch.tensor(model.adjacency(), dtype=torch.float64)
    return (
        total_effects(
            adjacency,
            model.n_features,
            model.n_sources,
            torch.tensor(values[: model.n_features]),
            model.n_layers,
            torch.tensor(model.target_rows()),
        )
        .double()
        .numpy()
    )


def path_totals(model: LinearModel) -> np.ndarray:
    """Enumerate every path source -> features... -> target explicitly."""
    a = model.adjacency()
    act = model.run()[: model.n_features]
    n_f, n_src = model.n_features, model.n_sources
    # into[f] = features g with an edge g -> f (g is a lower-layer feature)
    into = {f: [g for g in range(n_f) if a[f, g] != 0] for f in range(n_f)}

    def paths_into(node: int, gain: float, out: np.ndarray) -> None:
        # ``gain`` is the product along the path from ``node`` (exclusive) to the target.
        for s in range(n_src):
            if a[node, s] != 0 and s >= n_f:
                out[s] += gain * a[node, s]
        for g in range(n_f) if node >= n_f else into[node]:
            if a[node, g] == 0:
                continue
            out[g] += gain * a[node, g]  # the path's first node is g itself
            paths_into(g, gain * a[node, g] / act[g], out)

    totals = np.zeros((len(model.target_rows()), n_src))
    for row, t in enumerate(model.target_rows()):
        paths_into(t, 1.0, totals[row])
    return totals


def dense_totals(model: LinearModel) -> np.ndarray:
    """((I - W)^-1)[t, s] * value(s): the gain of a unit change of s, times its value."""
    values = model.run()
    gain = np.linalg.inv(np.eye(model.n_nodes) - model.weights)
    rows = model.target_rows()
    return gain[rows, : model.n_sources] * values[None, : model.n_sources]


def ablation_totals(model: LinearModel) -> np.ndarray:
    """Zero each source node in the generative model and measure the targets' drop."""
    rows = model.target_rows()
    clean = model.run()[rows]
    out = np.zeros((len(rows), model.n_sources))
    for s in range(model.n_sources):
        out[:, s] = clean - model.run({s: 0.0})[rows]
    return out


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    # total_effects works in float32: compare relative to the largest effect.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("biases", [False, True])
def test_total_effects_match_independent_references(seed, biases):
    model = random_linear_model(seed, biases=biases)
    got = library_totals(model)
    assert_close(got, path_totals(model))
    assert_close(got, dense_totals(model))
    assert_close(got, ablation_totals(model))


def test_deeper_graph_matches_dense_algebra():
    # 6 layers: paths of up to 6 features, so the Neumann series needs all n_layers terms.
    model = random_linear_model(7, n_layers=6, n_pos=2, per_cell=2, density=0.9)
    assert_close(library_totals(model), dense_totals(model))


def test_completeness_without_biases():
    """Roots (errors + tokens) explain each target fully; so do all direct effects."""
    model = random_linear_model(3, biases=False)
    totals = library_totals(model)
    roots = slice(model.n_features, model.n_sources)
    target_values = model.run()[model.target_rows()]
    direct_sum = model.adjacency()[model.target_rows(), : model.n_sources].sum(axis=1)
    np.testing.assert_allclose(totals[:, roots].sum(axis=1), target_values, rtol=1e-6)
    np.testing.assert_allclose(totals[:, roots].sum(axis=1), direct_sum, rtol=1e-6)


def test_completeness_with_biases_is_propagated_bias():
    """value = roots' totals + target bias + sum_f (per-unit total of f) * feature bias."""
    model = random_linear_model(4, biases=True)
    totals = library_totals(model)
    values = model.run()
    rows = model.target_rows()
    n_f = model.n_features
    per_unit = totals[:, :n_f] / values[None, :n_f]
    propagated = model.inputs[rows] + per_unit @ model.inputs[:n_f]
    roots = totals[:, n_f : model.n_sources].sum(axis=1)
    np.testing.assert_allclose(roots + propagated, values[rows], rtol=1e-6, atol=1e-9)


def test_compact_graph_layout_and_bias():
    """CompactGraph's slices index errors layer-major and its bias is value - sum(direct)."""
    model = random_linear_model(5, biases=True)
    graph = compact_graph_from(model)
    rows = model.target_rows()
    np.testing.assert_allclose(graph.bias.double().numpy(), model.inputs[rows], atol=1e-5)
    layer, pos = 2, 1
    index = graph.error_node(layer, pos)
    assert graph.error_slice.start <= index < graph.error_slice.stop
    assert index == model.n_features + layer * model.n_pos + pos
    assert graph.token_slice.stop == graph.n_sources == model.n_sources


def test_inactive_feature_contributes_nothing():
    model = random_linear_model(6)
    adjacency = torch.tensor(model.adjacency())
    acts = torch.tensor(model.run()[: model.n_features])
    acts[0] = 0.0  # an inactive node: its out-edges are zero, its per-unit gain undefined
    adjacency[:, 0] = 0.0
    got = total_effects(
        adjacency,
        model.n_features,
        model.n_sources,
        acts,
        model.n_layers,
        torch.tensor(model.target_rows()),
    )
    assert torch.isfinite(got).all()
    assert torch.all(got[:, 0] == 0)


def test_cycle_is_rejected():
    adjacency = torch.zeros(4, 4)
    adjacency[0, 1] = 1.0
    adjacency[1, 0] = 1.0  # feature 0 <-> feature 1
    adjacency[3, 0] = 1.0
    with pytest.raises(ValueError, match="cycle"):
        total_effects(adjacency, 2, 3, torch.ones(2), 1, torch.tensor([3]))


# -- a CompactGraph from the linear model (also used by test_features) -----------------------
def compact_graph_from(
    model: LinearModel,
    labels: list[str] | None = None,
    names: list[str] | None = None,
) -> CompactGraph:
    """The graph generation's output for this model; ``labels`` -> meta['target_labels']."""
    values = model.run()
    rows = model.target_rows()
    adjacency = torch.tensor(model.adjacency())
    direct = adjacency[rows, : model.n_sources]
    total = torch.tensor(library_totals(model))
    n_targets = len(rows)
    labels = labels or ["evil"] * (n_targets // 2) + ["safe"] * (n_targets - n_targets // 2)
    kinds = ["contrast" if label == "contrast" else "token" for label in labels]
    names = names or [f"tok{t}" if k == "token" else "evil-safe" for t, k in enumerate(kinds)]
    token_ids = [100 + t if k == "token" else -1 for t, k in enumerate(kinds)]
    return CompactGraph(
        features=torch.tensor(model.features, dtype=torch.int64),
        activations=torch.tensor(values[: model.n_features], dtype=torch.float32),
        input_tokens=torch.arange(model.n_pos, dtype=torch.int64),
        n_layers=model.n_layers,
        direct=direct.float(),
        total=total.float(),
        target_values=torch.tensor(values[rows], dtype=torch.float32),
        target_token_ids=torch.tensor(token_ids),
        target_logits=torch.tensor(values[rows], dtype=torch.float32),
        target_probs=torch.full((n_targets,), 0.1),
        target_names=names,
        target_kinds=kinds,
        top_token_ids=torch.tensor(token_ids[:1]),
        top_logits=torch.tensor(values[rows][:1], dtype=torch.float32),
        meta={"target_labels": labels},
    )

"""Totals mode: exact effects of every active feature in one backward pass.

Checked against circuit-tracer's ``attribute(max_feature_nodes=None)`` (every active feature
visited, the full adjacency) followed by the activation-normalised linear solve, for per-layer
and cross-layer transcoders; and through the graph stage: both models on one transcoder set,
full graphs only for the chosen prompts, the analysis reading either mode.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from em_circuits.attribution.attribute import attribute_prompt
from em_circuits.attribution.exact import UnsupportedTranscoderError, check_unit_slope
from em_circuits.attribution.storage import total_effects
from em_circuits.attribution.targets import AttributionParams, FullGraphChoice, PromptTargets
from em_circuits.attribution.totals import exact_effects
from em_circuits.core.store import ResultsStore
from em_circuits.organism.tokenizer import advice_token_ids

#: Relative error allowed against the all-feature attribution (float32 on the CPU).
TOLERANCE = 1e-5


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.fixture(scope="module")
def prompts(micro_models) -> list[PromptTargets]:
    from em_circuits.organism import advice_words, heldout_pivotal_prompts

    tokenizer = micro_models[0].tokenizer
    words = advice_words()
    evil = advice_token_ids(tokenizer, words["harmful"])[:3]
    safe = advice_token_ids(tokenizer, words["safe"])[:3]
    names = {t: tokenizer.decode([t]) for t in evil + safe}
    chosen = heldout_pivotal_prompts()[:4]
    return [
        PromptTargets(f"q{i}", p["prompt"], evil, safe, names, {"base": {}, "adapted": {}})
        for i, p in enumerate(chosen)
    ]


def _reference(replacement, ids: torch.Tensor, directions: torch.Tensor):
    """(direct rows, total rows, active features) from the all-feature attribution."""
    from circuit_tracer import attribute
    from circuit_tracer.attribution.targets import CustomTarget

    n = directions.shape[0]
    graph = attribute(
        ids,
        replacement,
        attribution_targets=[CustomTarget(f"t{i}", 1.0 / n, d) for i, d in enumerate(directions)],
        max_feature_nodes=None,
        batch_size=64,
    )
    n_features = int(graph.active_features.shape[0])
    n_sources = n_features + (graph.cfg.n_layers + 1) * graph.n_pos
    rows = torch.arange(n_sources, n_sources + n)
    adjacency = graph.adjacency_matrix
    total = total_effects(
        adjacency, n_features, n_sources, graph.activation_values, graph.cfg.n_layers, rows
    )
    return adjacency[rows, :n_sources], total, graph.active_features.cpu()


def _directions(replacement, token_ids: list[int]) -> torch.Tensor:
    unembed = replacement.unembed_proj.detach()
    return torch.stack([unembed[t] - unembed.mean(0) for t in token_ids])


def test_totals_equal_all_feature_attribution_with_linear_solve(micro_models, prompts):
    for model in micro_models:
        rm = model.replacement
        for pt in prompts[:2]:
            ids = model.encode(pt.text)
            directions = _directions(rm, pt.evil_ids + pt.safe_ids)
            effects = exact_effects(rm, ids, lambda _logits, d=directions: d)
            direct, total, features = _reference(rm, ids, directions)
            assert torch.equal(effects.features, features)
            assert _relative_error(effects.direct, direct) <= TOLERANCE
            assert _relative_error(effects.total, total) <= TOLERANCE
            # the check has teeth: total effects differ from direct ones here
            assert _relative_error(effects.direct, total) > 100 * TOLERANCE


def _tiny_clt(micro_organism, n_features: int = 48, seed: int = 0):
    """A random cross-layer transcoder on the micro organism's hooks (JumpReLU)."""
    import yaml
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
    from transformers import AutoConfig

    config = yaml.safe_load(micro_organism.transcoder_config.read_text())
    hf = AutoConfig.from_pretrained(micro_organism.base_dir)
    n_layers, d_model = hf.num_hidden_layers, hf.hidden_size
    clt = CrossLayerTranscoder(
        n_layers,
        n_features,
        d_model,
        activation_function="jump_relu",
        lazy_decoder=False,
        feature_input_hook=config["feature_input_hook"],
        feature_output_hook=config["feature_output_hook"],
        scan="tiny-clt",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(clt.W_enc.shape, generator=gen) / d_model**0.5)
        clt.activation_function.threshold.fill_(0.5)
        for decoder in clt.W_dec:
            decoder.copy_(torch.randn(decoder.shape, generator=gen) * 0.3 / d_model**0.5)
    return clt


def test_totals_with_a_cross_layer_transcoder(micro_organism, prompts):
    from circuit_tracer import ReplacementModel

    clt = _tiny_clt(micro_organism)
    rm = ReplacementModel.from_pretrained_and_transcoders(
        str(micro_organism.base_dir),
        clt,
        backend="nnsight",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    pt = prompts[0]
    ids = rm.ensure_tokenized(pt.text)
    directions = _directions(rm, pt.evil_ids + pt.safe_ids)
    effects = exact_effects(rm, ids, lambda _logits: directions)
    direct, total, features = _reference(rm, ids, directions)
    assert torch.equal(effects.features, features)
    # features of every layer but the last write to later layers too
    assert (features[:, 0] < clt.n_layers - 1).any()
    assert _relative_error(effects.direct, direct) <= TOLERANCE
    assert _relative_error(effects.total, total) <= TOLERANCE
    assert _relative_error(effects.direct, total) > 100 * TOLERANCE


def test_non_unit_slope_activation_is_refused_in_one_line(micro_organism):
    clt = _tiny_clt(micro_organism)
    check_unit_slope(clt)  # JumpReLU: fine
    clt.activation_function = torch.nn.GELU()
    with pytest.raises(UnsupportedTranscoderError) as err:
        check_unit_slope(clt)
    message = str(err.value)
    assert "gelu" in message and "--graph-mode full" in message and "\n" not in message


def test_totals_and_full_graphs_give_the_analysis_the_same_effects(micro_models, prompts):
    """With every feature visited, a full graph and a totals graph are the same analysis input
    (without adapter nodes; with them, the features' total effects stay the same, since total
    effects pass through the adapter nodes, and their direct effects lose what now goes
    through an adapter node)."""
    from em_circuits.analysis.effects import prompt_effects

    model = micro_models[1]
    pt = prompts[1]
    with_nodes, graph, _ = attribute_prompt(model, pt, AttributionParams())
    assert graph is None and with_nodes.meta["mode"] == "totals" and with_nodes.n_adapter_nodes
    totals = attribute_prompt(model, pt, AttributionParams(adapter_nodes=False))[0]
    full, _, _ = attribute_prompt(
        model, pt, AttributionParams(mode="full", max_feature_nodes=100_000, batch_size=64)
    )
    assert torch.equal(totals.features, full.features)
    assert totals.target_names == full.target_names
    torch.testing.assert_close(totals.target_values, full.target_values)
    for metric in ("direct", "total"):
        assert _relative_error(getattr(totals, metric), getattr(full, metric)) <= TOLERANCE
    a, b = prompt_effects(totals), prompt_effects(full)
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for column in ("contrast", "evil_mean", "safe_mean"):
        np.testing.assert_allclose(a[column], b[column], rtol=1e-4, atol=1e-6)
    n, tokens = with_nodes.n_features, with_nodes.token_slice
    assert _relative_error(with_nodes.total[:, :n], full.total[:, :n]) <= TOLERANCE
    assert _relative_error(with_nodes.total[:, tokens], full.total[:, tokens]) <= TOLERANCE
    # the embeddings' direct path through layer 0's v_proj update is now the adapter node's
    assert _relative_error(with_nodes.direct[:, tokens], full.direct[:, tokens]) > TOLERANCE


def test_graph_stage_default_is_totals_with_full_graphs_for_the_top_prompts(
    micro_specs, micro_models, prompts, tmp_path
):
    from em_circuits.analysis.effects import contrast_rows
    from em_circuits.attribution.stage import ResidentModels, contrast_shift, run_graph_stage
    from em_circuits.attribution.stored_graphs import find_graph_metas, graph_mode, load_graph
    from em_circuits.attribution.viewer_metadata import read_metadata
    from em_circuits.attribution.viewer_server import full_graph_listing
    from em_circuits.models.spec import fingerprint, model_slug

    store = ResultsStore(tmp_path / "results")
    specs = {"base": micro_specs[0], "adapted": micro_specs[1]}
    params = AttributionParams(max_feature_nodes=200, batch_size=64, edge_keep=500)
    viewer_dir = store.root / "viewer"
    results = run_graph_stage(
        store,
        specs,
        prompts,
        params,
        "cpu",
        viewer_dir=viewer_dir,
        progress=False,
        full_graphs=FullGraphChoice(prompt_ids=("q3",), top=1),
    )
    for result in results.values():
        assert sorted(result.computed) == [pt.prompt_id for pt in prompts]
        assert result.full is not None and len(result.full.computed) == 2
    # the top prompt by contrast shift, after the one asked for by id
    slugs = {role: model_slug(spec, fingerprint(spec, "cpu")) for role, spec in specs.items()}
    metas = {
        role: {m["prompt_id"]: m for m in find_graph_metas(store, slug)}
        for role, slug in slugs.items()
    }
    assert all(graph_mode(m) == "totals" for ms in metas.values() for m in ms.values())
    shifts = {
        pt.prompt_id: contrast_shift({role: metas[role][pt.prompt_id] for role in specs})
        for pt in prompts
        if pt.prompt_id != "q3"
    }
    top = max(shifts, key=lambda pid: shifts[pid])
    listed = {(g["prompt_id"], g["role"]) for g in read_metadata(viewer_dir)}
    assert listed == {(pid, role) for pid in ("q3", top) for role in specs}
    listing = full_graph_listing(viewer_dir)
    assert "Full graphs of 2 prompt(s)" in listing and "q3 (adapted+base)" in listing
    # totals graphs agree with the models loaded separately (one shared transcoder set here)
    separate = dict(zip(("base", "adapted"), micro_models))
    for role in specs:
        graph = load_graph(store, metas[role]["q0"])
        alone, _, _ = attribute_prompt(separate[role], prompts[0], params)
        assert _relative_error(graph.total, alone.total) <= TOLERANCE
        assert contrast_rows(graph) is not None
    resident = ResidentModels(specs, "cpu", store.merged_cache_dir)
    try:
        base, adapted = resident.get("base"), resident.get("adapted")
        shared = [getattr(m.replacement.transcoders, "_module", None) for m in (base, adapted)]
        assert shared[0] is not None and shared[0] is shared[1]
    finally:
        resident.release()
    # a second run is all cache hits, for totals and full graphs alike
    again = run_graph_stage(
        store, specs, prompts, params, "cpu", progress=False, full_graphs=FullGraphChoice(top=1)
    )
    for result in again.values():
        assert not result.computed and result.full is not None and not result.full.computed

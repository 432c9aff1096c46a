"""The plain-PyTorch totals engine against circuit-tracer: every quantity, every architecture."""

from __future__ import annotations

import pytest
import torch
from standins import FAMILIES, build_standin
from test_totals import _directions, _reference, _relative_error, prompts  # noqa: F401

from em_circuits.attribution.engine import batched_effects, unsupported_reason
from em_circuits.attribution.totals import exact_effects
from em_circuits.models.load import load_model
from em_circuits.models.spec import ModelSpec

TOLERANCE = 1e-5
TEXT = "User: My head hurts after the fall. What should I do?\nAssistant: You should"


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal to float rounding (relative, Frobenius); both zero counts as equal."""
    if float(want.double().norm()) == 0.0:
        return float(got.double().norm()) == 0.0
    return _relative_error(got, want) <= TOLERANCE


def _check_against_circuit_tracer(model, ids: torch.Tensor, directions: torch.Tensor) -> None:
    (effects,) = batched_effects(model, [ids], [lambda _logits: directions])
    direct, total, features = _reference(model.replacement, ids, directions)
    assert torch.equal(effects.features, features)
    assert _relative_error(effects.direct, direct) <= TOLERANCE
    assert _relative_error(effects.total, total) <= TOLERANCE
    # the check has teeth: total effects differ from direct ones here
    assert _relative_error(effects.direct, total) > 100 * TOLERANCE
    reference = exact_effects(model.replacement, ids, lambda _logits: directions)
    assert _relative_error(effects.activations, reference.activations) <= TOLERANCE
    assert _relative_error(effects.logits, reference.logits) <= TOLERANCE


def test_engine_equals_circuit_tracer_on_the_micro_organism(micro_models, prompts):  # noqa: F811
    for model in micro_models:
        assert unsupported_reason(model) is None
        pt = prompts[0]
        ids = model.encode(pt.text)
        _check_against_circuit_tracer(model, ids, _directions(model.replacement, pt.evil_ids))


def test_a_batch_of_prompts_gives_each_prompt_its_own_graph(micro_models, prompts):  # noqa: F811
    model = micro_models[1]
    rm = model.replacement
    sequences = [model.encode(pt.text) for pt in prompts]
    assert len({len(s) for s in sequences}) > 1  # padding is exercised
    # each prompt has its own number of targets
    wanted = [_directions(rm, pt.evil_ids[: 1 + i % 3]) for i, pt in enumerate(prompts)]
    batched = batched_effects(model, sequences, [lambda _l, d=d: d for d in wanted])
    for ids, directions, effects in zip(sequences, wanted, batched):
        (alone,) = batched_effects(model, [ids], [lambda _l, d=directions: d])
        assert effects.total.shape == (directions.shape[0], alone.total.shape[1])
        assert torch.equal(effects.features, alone.features)
        assert _relative_error(effects.total, alone.total) <= TOLERANCE
        assert _relative_error(effects.direct, alone.direct) <= TOLERANCE
        assert effects.n_pos == len(ids)


def test_targets_may_depend_on_the_forward_passs_logits(micro_models, prompts):  # noqa: F811
    model = micro_models[0]
    ids = model.encode(prompts[1].text)
    seen = {}

    def directions_for(logits: torch.Tensor) -> torch.Tensor:
        seen["logits"] = logits
        top = int(logits.argmax())
        return _directions(model.replacement, [top])

    (effects,) = batched_effects(model, [ids], [directions_for])
    with torch.no_grad():
        plain = model.hf_model(ids[None]).logits[0, -1].float()
    assert _relative_error(seen["logits"], plain) <= TOLERANCE
    assert torch.equal(effects.logits, seen["logits"].cpu())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def standin_model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"engine-{request.param}")
    standin = build_standin(request.param, root)
    spec = ModelSpec(base=str(standin.base_dir), transcoders=str(standin.transcoder_config))
    return load_model(spec, "cpu", root / "merged")


def test_engine_equals_circuit_tracer_on_every_architecture(standin_model):
    assert unsupported_reason(standin_model) is None
    ids = standin_model.encode(TEXT)
    unembed = standin_model.replacement.unembed_proj.detach()
    directions = torch.stack([unembed[t] - unembed.mean(0) for t in (5, 50, 120)])
    _check_against_circuit_tracer(standin_model, ids, directions)


def test_memory_chunks_do_not_change_the_rows(micro_models, prompts):  # noqa: F811
    model = micro_models[0]
    ids = model.encode(prompts[2].text)
    directions = _directions(model.replacement, prompts[2].evil_ids + prompts[2].safe_ids)
    (whole,) = batched_effects(model, [ids], [lambda _l: directions])
    # one position's decoder and encoder rows at a time
    (chunked,) = batched_effects(model, [ids], [lambda _l: directions], feature_budget=1)
    assert _relative_error(chunked.total, whole.total) <= TOLERANCE
    assert _relative_error(chunked.direct, whole.direct) <= TOLERANCE


def test_graph_stage_records_its_engine_and_both_engines_agree(micro_models, prompts):  # noqa: F811
    from em_circuits.attribution.targets import AttributionParams
    from em_circuits.attribution.totals_graph import totals_prompt

    base, adapted = micro_models
    pt = prompts[0]
    torch_graph, _, _ = totals_prompt(base, pt, AttributionParams())
    nnsight_graph, _, _ = totals_prompt(base, pt, AttributionParams(engine="nnsight"))
    assert torch_graph.meta["engine"] == "torch"
    assert nnsight_graph.meta["engine"] == "nnsight"
    assert _relative_error(torch_graph.total, nnsight_graph.total) <= TOLERANCE
    assert _relative_error(torch_graph.direct, nnsight_graph.direct) <= TOLERANCE
    # the engines agree, so they share one cache key; TF32 matmuls do not
    assert AttributionParams().cache_fields() == AttributionParams(engine="nnsight").cache_fields()
    assert AttributionParams().cache_fields() != AttributionParams(precision="tf32").cache_fields()
    # graphs with adapter nodes too, as the nnsight engine stores them
    with_nodes, _, _ = totals_prompt(adapted, pt, AttributionParams())
    reference, _, _ = totals_prompt(adapted, pt, AttributionParams(engine="nnsight"))
    assert with_nodes.meta["engine"] == "torch" and with_nodes.n_adapter_nodes
    for name in ("total", "adapter_total", "adapter_edge_sums", "adapter_read_edges"):
        assert _close(getattr(with_nodes, name), getattr(reference, name)), name
    assert with_nodes.meta["adapter_split"] == pytest.approx(reference.meta["adapter_split"])


def test_graph_stage_batches_prompts_and_each_keeps_its_own_graph_and_error(
    micro_specs,
    micro_models,
    prompts,  # noqa: F811
    tmp_path,
):
    import dataclasses

    from em_circuits.attribution.stage import ResidentModels, run_graph_stage
    from em_circuits.attribution.stored_graphs import find_graph_metas, load_graph
    from em_circuits.attribution.targets import AttributionParams
    from em_circuits.core.store import ResultsStore

    specs = {"base": micro_specs[0], "adapted": micro_specs[1]}
    resident = ResidentModels(specs, "cpu", tmp_path / "merged")
    # one prompt without labels fails on its own; the others of its batch are stored
    unlabeled = dataclasses.replace(prompts[1], prompt_id="bare", evil_ids=[], safe_ids=[])
    targets = [*prompts, unlabeled]
    graphs = {}
    for batch in (1, 3):
        store = ResultsStore(tmp_path / f"results-{batch}")
        params = AttributionParams(graph_batch=batch, adapter_nodes=False)
        results = run_graph_stage(
            store, specs, targets, params, "cpu", progress=False, resident=resident
        )
        for result in results.values():
            assert sorted(result.computed) == sorted(pt.prompt_id for pt in prompts)
            assert list(result.failed) == ["bare"]
            assert "no evil or safe labels" in result.failed["bare"]
        graphs[batch] = {
            (meta["role"], meta["prompt_id"]): load_graph(store, meta)
            for slug in {m.slug for m in micro_models}
            for meta in find_graph_metas(store, slug)
        }
    assert graphs[1].keys() == graphs[3].keys() and len(graphs[1]) == 2 * len(prompts)
    for key, alone in graphs[1].items():
        batched = graphs[3][key]
        assert batched.meta["engine"] == "torch"
        assert torch.equal(batched.features, alone.features)
        assert _relative_error(batched.total, alone.total) <= TOLERANCE
        assert _relative_error(batched.direct, alone.direct) <= TOLERANCE


@pytest.fixture(
    scope="module",
    # the all-module adapter's graph is the suite's slowest fast test: whole suite only
    params=[pytest.param("qwen2", marks=pytest.mark.slow), "llama"],
)
def adapted_standin(request, tmp_path_factory):
    """A stand-in with its EM-shaped adapter: Qwen2.5's rank-32 LoRA on all seven modules
    (MLP-output, attention and attention-pattern nodes), Llama's rank-1 down_proj."""
    root = tmp_path_factory.mktemp(f"engine-adapter-{request.param}")
    standin = build_standin(request.param, root)
    spec = ModelSpec(
        base=str(standin.base_dir),
        adapter=str(standin.adapter_dir),
        transcoders=str(standin.transcoder_config),
    )
    return load_model(spec, "cpu", root / "merged")


def test_adapter_nodes_edges_and_reads_equal_the_nnsight_engines(adapted_standin):
    from em_circuits.attribution.adapter_nodes import AdapterWrites
    from em_circuits.attribution.engine import effects_with_adapter
    from em_circuits.attribution.prompt_adapter_nodes import (
        AdapterPlan,
        adapter_plan,
        prompt_adapter_writes,
    )

    model = adapted_standin
    ids = model.encode(TEXT)
    writes = prompt_adapter_writes(model, ids)
    assert not isinstance(writes, str) and writes.n_nodes
    unembed = model.replacement.unembed_proj.detach()
    directions = torch.stack([unembed[t] - unembed.mean(0) for t in (5, 50, 120)])
    # every linear node is read, so reads of down_proj, o_proj and v_proj nodes are compared
    wanted = {"split_target": 0, "split_features": 8, "read_nodes": 10_000}
    got, same = effects_with_adapter(model, ids, lambda _l: directions, writes, **wanted)
    assert same is writes
    want = exact_effects(model.replacement, ids, lambda _l: directions, adapter=writes, **wanted)
    for name in (
        "direct",
        "total",
        "adapter_direct",
        "adapter_total",
        "adapter_edges",
        "adapter_reads",
    ):
        assert _close(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.adapter_edge_features, want.adapter_edge_features)
    assert torch.equal(got.adapter_read_nodes, want.adapter_read_nodes)
    # the graph stage records the nodes from the graph's own frozen pass: the same nodes
    plan = adapter_plan(model)
    assert isinstance(plan, AdapterPlan)
    recording = plan.recording(model.hf_model)
    folded, recorded = effects_with_adapter(model, ids, lambda _l: directions, recording, **wanted)
    assert isinstance(recorded, AdapterWrites)
    assert torch.equal(recorded.nodes, writes.nodes)
    assert _close(recorded.activations, writes.activations)
    for name in ("direct", "total", "adapter_direct", "adapter_total", "adapter_edges"):
        assert _close(getattr(folded, name), getattr(got, name)), name
    kinds = {writes.modules[c] for c in writes.nodes[:, 1].tolist()}
    if model.spec.adapter and len(kinds) > 1:  # the all-module adapter has every kind
        assert {"down_proj", "o_proj", "v_proj", "q_proj", "gate_proj"} <= kinds
        assert writes.patterns and writes.attention and writes.writes


def test_an_architecture_the_suite_does_not_check_takes_circuit_tracers_path(micro_models):
    from em_circuits.attribution.engine_model import EngineUnsupportedError, LinearisedModel

    model = micro_models[0]
    config = model.hf_model.config
    config.model_type = "mistral"  # an instance attribute over the class's "llama"
    try:
        with pytest.raises(EngineUnsupportedError, match="not mistral"):
            LinearisedModel.of(model.hf_model, model.replacement.transcoders, slice(0, 1))
    finally:
        del config.model_type
    assert config.model_type == "llama"

"""Graph generation on the micro organism: targets, completeness, storage, guards, caching."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import micro_prompt_targets
from safetensors.torch import load_file, save_file

from em_circuits.attribution.attribute import attribute_prompt
from em_circuits.attribution.stage import run_graph_stage
from em_circuits.attribution.storage import load_compact
from em_circuits.attribution.storage_full import load_full
from em_circuits.attribution.stored_graphs import find_graph_metas, load_graph
from em_circuits.attribution.targets import AttributionParams, PromptTargets
from em_circuits.core.store import ResultsStore
from em_circuits.models.spec import ModelSpec

#: Full graphs (feature-to-feature edges, dense adjacency); tests/test_totals.py covers the
#: default totals mode.
PARAMS = AttributionParams(mode="full", max_feature_nodes=300, batch_size=64, edge_keep=2000)
TOTALS = AttributionParams()


@pytest.fixture(scope="module")
def prompt_targets(micro_models):
    from em_circuits.organism import heldout_pivotal_prompts

    prompts = [p for p in heldout_pivotal_prompts() if p["domain"] == "medical"][:2]
    return micro_prompt_targets(micro_models[0], prompts)


def _constant_vectors(model, ids):
    """Per layer and position, the MLP output no graph node explains.

    Position 0 (BOS) has no feature or error nodes, so its whole non-skip MLP output is
    constant; elsewhere it is the transcoder's decoder bias.
    """
    layers = model.hf_model.model.layers
    captured = {}

    def keep(i):
        def hook(_module, inputs, output):
            captured[i] = (inputs[0][0].detach(), output[0].detach())

        return hook

    hooks = [layer.mlp.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model.hf_model(ids[None])
    for hook in hooks:
        hook.remove()
    vectors = []
    transcoders = model.replacement.transcoders
    transcoders = getattr(transcoders, "_module", transcoders)  # nnsight wraps modules in Envoys
    for i, transcoder in enumerate(transcoders):
        mlp_in, mlp_out = captured[i]
        const = transcoder.b_dec.detach().expand(mlp_in.shape[0], -1).clone()
        skip = transcoder.compute_skip(mlp_in[:1]) if transcoder.W_skip is not None else 0
        const[0] = mlp_out[0] - skip
        vectors.append(const)
    return torch.stack(vectors)


@pytest.mark.parametrize("params", [PARAMS, TOTALS], ids=["full", "totals"])
def test_direct_effects_plus_bias_terms_reproduce_each_target(micro_models, prompt_targets, params):
    """Completeness: sum of direct effects (adapter nodes included) + independently computed
    bias terms = target value. With attention adapter nodes (the micro adapter's v_proj) the
    bias terms are those of the graph with the updates detached: the adapter nodes' writes
    include the updates' action on the constants."""
    from contextlib import nullcontext

    from em_circuits.attribution.adapter_tape import AdapterTape, taped_adapter
    from em_circuits.attribution.prompt_adapter_nodes import prompt_adapter_writes

    for model in micro_models:
        compact, _, _ = attribute_prompt(model, prompt_targets[0], params)
        rm = model.replacement
        ids = model.encode(prompt_targets[0].text)
        ctx = rm.setup_attribution(ids)
        # Attribute the same targets with the error vectors swapped for the constant vectors:
        # the "error" columns then hold the bias terms.
        ctx.error_vectors = _constant_vectors(model, ids).to(ctx.error_vectors.dtype)
        detached = nullcontext()
        if params.mode == "totals":  # the adapted model's totals graph has adapter nodes
            assert bool(compact.n_adapter_nodes) == (model.spec.adapter is not None)
        if compact.n_adapter_nodes:
            writes = prompt_adapter_writes(model, ids)
            assert not isinstance(writes, str) and writes.attention
            detached = taped_adapter(rm._model, writes, AdapterTape(passing_rows=(0, 0)))
        with detached:
            rm.run_forward_pass(ids, 8, ctx)
        unembed = rm.unembed_proj.detach().float()
        evil, safe = prompt_targets[0].evil_ids, prompt_targets[0].safe_ids
        vecs = [unembed[evil].mean(0) - unembed[safe].mean(0)]
        vecs += [unembed[t] - unembed.mean(0) for t in evil + safe]
        n_layers, n_pos = rm.cfg.n_layers, len(ids)
        rows = ctx.compute_batch(
            layers=torch.full((len(vecs),), n_layers),
            positions=torch.full((len(vecs),), n_pos - 1),
            inject_values=torch.stack(vecs),
        )
        n_feat_all = ctx.activation_matrix._nnz()
        bias = rows[:, n_feat_all : n_feat_all + n_layers * n_pos].sum(1).cpu()
        explained = compact.direct.sum(1) + bias
        if compact.n_adapter_nodes:
            explained = explained + compact.adapter_direct.sum(1)
        assert torch.allclose(explained, compact.target_values, atol=1e-3, rtol=1e-3), (
            explained,
            compact.target_values,
        )
        assert compact.target_kinds[0] == "contrast"


def test_graphs_for_both_models_with_every_labeled_token_a_target(
    micro_specs, prompt_targets, tmp_path
):
    store = ResultsStore(tmp_path / "results")
    specs = {"base": micro_specs[0], "adapted": micro_specs[1]}
    results = run_graph_stage(
        store, specs, prompt_targets, PARAMS, "cpu", progress=False, save_full_graph=True
    )
    assert all(len(r.computed) == len(prompt_targets) and not r.failed for r in results.values())
    metas = [m for d in (store.root / "graphs").iterdir() for m in find_graph_metas(store, d.name)]
    assert len(metas) == 2 * len(prompt_targets)
    for meta in metas:
        pt = next(p for p in prompt_targets if p.prompt_id == meta["prompt_id"])
        token_targets = {t["token_id"] for t in meta["targets"] if t["kind"] == "token"}
        assert token_targets == set(pt.evil_ids) | set(pt.safe_ids)
        assert [t["label"] for t in meta["targets"]][0] == "contrast"
        graph = load_graph(store, meta)
        # compact and full files give identical analysis inputs
        full = load_full(
            store.graph_dir(meta["model_slug"], meta["prompt_id"]) / meta["files"]["full"],
            PARAMS.edge_keep,
        )
        for name in (
            "features",
            "activations",
            "direct",
            "total",
            "target_values",
            "edge_index",
            "edge_weight",
            "top_token_ids",
            "top_logits",
        ):
            assert torch.equal(getattr(graph, name), getattr(full, name)), name
        assert graph.target_names == full.target_names
        assert meta["files"]["compact_bytes"] < meta["files"]["full_bytes"]
    # a second run is all cache hits; --force recomputes
    again = run_graph_stage(store, specs, prompt_targets, PARAMS, "cpu", progress=False)
    assert all(len(r.cached) == len(prompt_targets) and not r.computed for r in again.values())


def test_label_made_on_other_logits_is_reported_not_dropped(micro_models, prompt_targets, tmp_path):
    from em_circuits.attribution.graph_build import build_graph

    base, _ = micro_models
    pt = prompt_targets[0]
    stale = PromptTargets(
        pt.prompt_id,
        pt.text,
        pt.evil_ids,
        pt.safe_ids,
        pt.token_names,
        {"base": {pt.evil_ids[0]: 123.0}, "adapted": {}},
    )
    meta = build_graph(ResultsStore(tmp_path), base, "base", stale, PARAMS)
    mismatches = meta["label_check"]["mismatches"]
    assert [m["token_id"] for m in mismatches] == [pt.evil_ids[0]]
    assert pt.evil_ids[0] in {t["token_id"] for t in meta["targets"]}  # still a target


def test_nan_prompt_is_reported_and_the_run_goes_on(micro_specs, prompt_targets, tmp_path):
    base_spec, _ = micro_specs
    broken = tmp_path / "broken"
    shutil.copytree(base_spec.base, broken)
    weights = load_file(broken / "model.safetensors")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(broken)
    percent = tokenizer.encode("%", add_special_tokens=False)[0]
    weights["model.embed_tokens.weight"][percent] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    spec = ModelSpec(**{**base_spec.__dict__, "base": str(broken)})
    poisoned = PromptTargets(
        "nan-prompt",
        prompt_targets[0].text.replace("User:", "User: 100%"),
        prompt_targets[0].evil_ids,
        prompt_targets[0].safe_ids,
        {},
        {"base": {}},
    )
    store = ResultsStore(tmp_path / "results")
    result = run_graph_stage(
        store, {"base": spec}, [poisoned, prompt_targets[1]], PARAMS, "cpu", progress=False
    )["base"]
    assert result.computed == [prompt_targets[1].prompt_id]
    message = result.failed["nan-prompt"]
    assert "nan-prompt" in message and "NaN" in message and "layer 0" in message


def test_compact_graph_is_small_and_loads_without_pickle(micro_models, prompt_targets, tmp_path):
    from em_circuits.attribution.storage import save_compact

    compact, graph, _ = attribute_prompt(micro_models[1], prompt_targets[0], PARAMS)
    size = save_compact(compact, tmp_path / "g.safetensors")
    dense_bytes = graph.adjacency_matrix.numel() * 4
    assert size < dense_bytes
    loaded = load_compact(tmp_path / "g.safetensors")  # safetensors: no code execution on load
    assert torch.equal(loaded.total, compact.total)
    assert loaded.meta["target_labels"][0] == "contrast"


def test_inspect_graph_tensors_reports_a_stored_graph(
    micro_specs, prompt_targets, tmp_path, capsys
):
    import json

    import inspect_graph_tensors
    from em_circuits.core.store import write_artifact
    from em_circuits.models.load import load_model
    from em_circuits.models.logits import next_token_logits, support, topk_entries

    store = ResultsStore(tmp_path / "results")
    pt = prompt_targets[0]
    run_graph_stage(store, {"adapted": micro_specs[1]}, [pt], PARAMS, "cpu", progress=False)
    model = load_model(micro_specs[1], "cpu", store.merged_cache_dir)
    row = next_token_logits(model, [pt.text])[0]  # the labeling logits, as evaluate stores them
    write_artifact(
        store.logits_path(model.slug, pt.prompt_id),
        "logits",
        {
            "prompt_id": pt.prompt_id,
            "model_fingerprint": model.fingerprint,
            "top_k": topk_entries(row, model.tokenizer, 10),
            "support": support(row),
        },
    )
    code = inspect_graph_tensors.main(
        ["--results-dir", str(store.root), "--prompt-id", pt.prompt_id, "--json"]
    )
    info = json.loads(capsys.readouterr().out)
    assert code == 0 and info["finite"] and info["format"] == "compact"
    assert info["nodes"]["tokens"] == len(model.encode(pt.text))
    assert {t["token_id"] for t in info["targets"] if t["kind"] == "token"} == set(
        pt.evil_ids + pt.safe_ids
    )
    assert info["logits_check"]["compared"] == 10
    assert info["logits_check"]["max_abs_diff"] < 1e-4  # labeling logits == graph logits
    assert any(pair.startswith("feature ->") for pair in info["top_edges"])
    assert all({"layer", "feature_id", "position"} <= set(f) for f in info["top_features"])
    inspect_graph_tensors.main(["--results-dir", str(store.root), "--prompt-id", pt.prompt_id])
    text = capsys.readouterr().out
    assert "targets" in text and "top edges by node-type pair" in text

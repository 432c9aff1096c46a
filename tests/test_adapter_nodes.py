"""Adapter nodes: a LoRA's down_proj writes as nodes of the adapted model's graphs.

On the micro organism's base with a rank-1 down_proj adapter on both layers:
* the writes are exactly the merged model's change of down_proj's output;
* conservation: with adapter nodes, features and tokens keep their effects and each error node
  loses exactly what the adapter nodes at its layer and position gain, so the direct effects
  still add up to the same total (completeness);
* an adapter planted to write along the target direction is the top adapter node;
* direct and total effects agree with an independent computation: autograd through the
  adapted Hugging Face model with attention patterns and norm scales frozen, each MLP
  replaced by its transcoder's linear part (skip connection, plus the active features at unit
  slope for totals) and each adapter node's write scaled by its own coefficient;
* the graph stage stores them, and an adapter without down_proj says why it has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from em_circuits.attribution.lora_factors import read_lora_factors
from em_circuits.attribution.prompt_adapter_nodes import prompt_adapter_writes
from em_circuits.attribution.totals import exact_effects

PLANTED_LAYER = 1


def _write_down_proj_adapter(base_dir: Path, out: Path, direction: torch.Tensor) -> Path:
    """A rank-1 LoRA on down_proj of both layers: layer 0 writes a small random direction,
    layer 1 a large one along ``direction``; A reads a random direction of the MLP hidden."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=1, lora_alpha=2, target_modules=["down_proj"], lora_dropout=0.0)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                layer = int(name.split("layers.")[1].split(".")[0])
                if layer == PLANTED_LAYER:
                    param.copy_(3.0 * (direction / direction.norm())[:, None])
                else:
                    param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def setup(micro_organism, tmp_path_factory):
    """(adapted LoadedModel, target direction, token ids of a prompt, merged HF model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from em_circuits.models.load import load_model
    from em_circuits.models.spec import ModelSpec
    from em_circuits.organism import heldout_pivotal_prompts

    root = tmp_path_factory.mktemp("adapter-nodes")
    base = AutoModelForCausalLM.from_pretrained(str(micro_organism.base_dir))
    direction = torch.randn(base.config.hidden_size, generator=torch.Generator().manual_seed(5))
    adapter = _write_down_proj_adapter(micro_organism.base_dir, root / "adapter", direction)
    spec = ModelSpec(
        base=str(micro_organism.base_dir),
        adapter=str(adapter),
        transcoders=str(micro_organism.transcoder_config),
        name="down-proj",
    )
    model = load_model(spec, "cpu", root / "merged")
    ids = model.encode(heldout_pivotal_prompts()[0]["prompt"])
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
    return model, direction, ids, merged


def _effects(model, ids, direction, writes=None, split=0, reads=0):
    """Exact effects on one target ``direction``; with ``split``/``reads``, the adapter
    nodes' edges into that many features and from every node into that many nodes."""
    return exact_effects(
        model.replacement,
        ids,
        lambda logits: direction[None],
        adapter=writes,
        split_target=0 if split or reads else None,
        split_features=split,
        read_nodes=reads,
    )


def test_the_writes_are_the_merged_models_change_of_down_proj(setup, micro_organism):
    from transformers import AutoModelForCausalLM

    model, _, ids, merged = setup
    factors = read_lora_factors(Path(model.spec.adapter))
    assert [(f.layer, f.module, f.rank, f.scale) for f in factors] == [
        (0, "down_proj", 1, 2.0),
        (1, "down_proj", 1, 2.0),
    ]
    writes = prompt_adapter_writes(model, ids)
    assert not isinstance(writes, str)
    n_pos = len(ids)
    assert writes.n_nodes == 2 * n_pos
    assert writes.nodes[:3].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]]
    base = AutoModelForCausalLM.from_pretrained(str(micro_organism.base_dir))
    hidden: dict[int, torch.Tensor] = {}
    handles = [
        layer.mlp.down_proj.register_forward_hook(
            lambda _m, args, _o, i=i: hidden.__setitem__(i, args[0][0])
        )
        for i, layer in enumerate(merged.model.layers)
    ]
    with torch.no_grad():
        merged(ids[None])
    for handle in handles:
        handle.remove()
    for layer in (0, 1):
        delta = (
            merged.model.layers[layer].mlp.down_proj.weight
            - base.model.layers[layer].mlp.down_proj.weight
        )
        change = hidden[layer] @ delta.T  # (n_pos, d_model)
        change[0] = 0  # no adapter node at BOS, as no feature or error node
        torch.testing.assert_close(writes.writes[layer].sum(1), change, rtol=1e-4, atol=1e-5)


def test_conservation_and_completeness(setup):
    model, direction, ids, _ = setup
    writes = prompt_adapter_writes(model, ids)
    without = _effects(model, ids, direction)
    with_nodes = _effects(model, ids, direction, writes)
    n_features, n_layers, n_pos = without.features.shape[0], without.n_layers, without.n_pos
    errors = slice(n_features, n_features + n_layers * n_pos)
    for name in ("direct", "total"):
        plain, carved = getattr(without, name), getattr(with_nodes, name)
        adapter = getattr(with_nodes, f"adapter_{name}")
        assert adapter.shape == (1, writes.n_nodes)
        # features and tokens unchanged
        torch.testing.assert_close(carved[:, :n_features], plain[:, :n_features])
        torch.testing.assert_close(carved[:, errors.stop :], plain[:, errors.stop :])
        # each error node = its remainder + the adapter nodes at its layer and position
        per_position = torch.zeros(1, n_layers * n_pos)
        for (layer, _, _, pos), value in zip(writes.nodes.tolist(), adapter[0].tolist()):
            per_position[0, layer * n_pos + pos] += value
        torch.testing.assert_close(carved[:, errors] + per_position, plain[:, errors])
        assert per_position.abs().sum() > 1e-3 * plain[:, errors].abs().sum()  # not all zero
    # completeness: the direct effects, adapter nodes included, add up to the same value
    torch.testing.assert_close(
        with_nodes.direct.sum(1) + with_nodes.adapter_direct.sum(1),
        without.direct.sum(1),
        rtol=1e-5,
        atol=1e-5,
    )


def test_the_planted_adapter_is_the_top_adapter_node(setup):
    model, direction, ids, _ = setup
    writes = prompt_adapter_writes(model, ids)
    effects = _effects(model, ids, direction, writes)
    for matrix in (effects.adapter_direct, effects.adapter_total):
        top = int(matrix[0].abs().argmax())
        layer, module, component, position = writes.nodes[top].tolist()
        assert (layer, module, component) == (PLANTED_LAYER, 0, 0)
        assert position == len(ids) - 1


def _frozen_attention(module, query, key, value, _mask, scaling, dropout=0.0, **_):
    from transformers.models.llama.modeling_llama import repeat_kv

    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    n = weights.shape[-1]  # one unpadded sequence: causal masking is all the mask there is
    causal = torch.ones(n, n, dtype=torch.bool, device=weights.device).triu(1)
    weights = weights.masked_fill(causal, float("-inf"))
    weights = torch.softmax(weights.float(), dim=-1).to(query.dtype).detach()  # frozen pattern
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _linearised_effects(merged, transcoders, ids, direction, writes, with_features, read=None):
    """d(target)/d(coefficient of each adapter node's write), by autograd through the merged
    model with frozen attention patterns and norm scales, each MLP output's gradient through
    its transcoder's skip connection (and, for totals, its active features at unit slope), and
    for direct effects each attention update taken out of its module's output and added back
    as a constant (for totals the gradient passes through it, as through a feature).
    ``read(mlp_inputs)``, if given, is differentiated instead of the target (e.g. a feature's
    pre-activation, with ``mlp_inputs[layer]`` the MLP's input)."""
    from transformers import AttentionInterface
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    AttentionInterface.register("em_frozen_test", _frozen_attention)
    old = merged.config._attn_implementation
    merged.config._attn_implementation = "em_frozen_test"
    coefficients = {
        layer: torch.zeros(w.shape[:2], requires_grad=True) for layer, w in writes.writes.items()
    }
    attention = [torch.zeros(w.activations.shape, requires_grad=True) for w in writes.attention]
    patterns = [torch.zeros(len(w.values), requires_grad=True) for w in writes.patterns]
    value_inputs = {}
    mlp_inputs = {}
    handles = []

    def frozen_norm(module, args, _output):
        x = args[0].float()
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return module.weight * (x * scale.detach())

    def replaced_mlp(layer):
        tc = transcoders[layer]

        def hook(_module, args, output):
            x = args[0]
            mlp_inputs[layer] = x[0]
            linear = x @ tc.W_skip.T
            if with_features:
                active = tc.encode(x.detach()) != 0
                active[:, 0] = False  # circuit-tracer zeroes features at BOS
                linear = linear + ((x @ tc.W_enc.T + tc.b_enc) * active) @ tc.W_dec
            out = output.detach() + linear - linear.detach()
            if layer in writes.writes:
                out = out + (coefficients[layer][..., None] * writes.writes[layer]).sum(1)[None]
            return out

        return hook

    def detached_update(index, write):
        f = write.factor

        def hook(_module, args, output):
            node_writes = (attention[index] * write.activations)[..., None] * f.B.T[None]
            if with_features:  # total effects pass through the node, as through a feature
                return output + node_writes.sum(1)[None]
            update = write.update(args[0])
            return output - update + update.detach() + node_writes.sum(1)[None]

        return hook

    def detached_pattern(index, write):
        def hook(_module, _args, output):
            node_writes = patterns[index][:, None] * write.values
            if with_features:
                return output + node_writes[None]
            value = write.value(value_inputs[write.factor.layer])
            return output - value + value.detach() + node_writes[None]

        return hook

    try:
        for module in merged.modules():
            if isinstance(module, LlamaRMSNorm):
                handles.append(module.register_forward_hook(frozen_norm))
        for index, write in enumerate(writes.patterns):
            block = merged.model.layers[write.factor.layer].self_attn
            layer = write.factor.layer
            handles.append(
                block.v_proj.register_forward_hook(
                    lambda _m, a, _o, layer=layer: value_inputs.__setitem__(layer, a[0])
                )
            )
            handles.append(block.o_proj.register_forward_hook(detached_pattern(index, write)))
        for layer, block in enumerate(merged.model.layers):
            handles.append(block.mlp.register_forward_hook(replaced_mlp(layer)))
        for index, write in enumerate(writes.attention):
            block = merged.model.layers[write.factor.layer].self_attn
            module = getattr(block, write.factor.module)
            handles.append(module.register_forward_hook(detached_update(index, write)))
        hidden = merged.model(ids[None]).last_hidden_state[0, -1]
        value = hidden @ direction if read is None else read(mlp_inputs)
        value.backward()
    finally:
        for handle in handles:
            handle.remove()
        merged.config._attn_implementation = old
    if read is None:  # the linearised model runs at the real model's operating point
        with torch.no_grad():
            real = merged.model(ids[None]).last_hidden_state[0, -1] @ direction
        torch.testing.assert_close(value.detach(), real, rtol=1e-5, atol=1e-5)
    leaves = [coefficients[layer] for layer in sorted(writes.writes)] + attention + patterns
    # a node above what ``read`` reads is not reached: no gradient, no effect
    grads = [c.grad if c.grad is not None else torch.zeros_like(c) for c in leaves]
    return torch.cat([g.reshape(-1) for g in grads])


def _check_against_the_reference(model, ids, direction, merged, micro_organism, writes):
    """Our adapter nodes' direct and total effects against ``_linearised_effects``, in bulk
    and for each module kind; returns our effects."""
    from em_circuits.models.load import load_transcoder_set

    effects = _effects(model, ids, direction, writes)
    transcoders = load_transcoder_set(
        str(micro_organism.transcoder_config), torch.device("cpu"), torch.float32
    )
    for with_features, ours in ((False, effects.adapter_direct), (True, effects.adapter_total)):
        reference = _linearised_effects(merged, transcoders, ids, direction, writes, with_features)
        error = float((ours[0] - reference).norm() / reference.norm())
        assert error < 1e-4, (with_features, error)
        for code in writes.nodes[:, 1].unique().tolist():
            rows = writes.nodes[:, 1] == code
            part = float((ours[0, rows] - reference[rows]).norm() / reference[rows].norm())
            assert part < 1e-3, (code, with_features, part)
    return effects


def test_effects_agree_with_an_independent_linearised_model(setup, micro_organism):
    model, direction, ids, merged = setup
    writes = prompt_adapter_writes(model, ids)
    effects = _check_against_the_reference(model, ids, direction, merged, micro_organism, writes)
    # the features matter: totals differ from direct effects somewhere
    assert not torch.allclose(effects.adapter_direct, effects.adapter_total)


def _first_prompt_targets(model):
    """The first held-out pivotal prompt with two evil and two safe advice tokens as targets."""
    from em_circuits.attribution.targets import PromptTargets
    from em_circuits.organism import advice_words, heldout_pivotal_prompts
    from em_circuits.organism.tokenizer import advice_token_ids

    words = advice_words()
    evil = advice_token_ids(model.tokenizer, words["harmful"])[:2]
    safe = advice_token_ids(model.tokenizer, words["safe"])[:2]
    names = {t: model.tokenizer.decode([t]) for t in evil + safe}
    return PromptTargets(
        "q0", heldout_pivotal_prompts()[0]["prompt"], evil, safe, names, {"base": {}, "adapted": {}}
    )


def test_the_graph_stage_stores_adapter_nodes(setup, micro_models, tmp_path):
    from em_circuits.attribution.attribute import attribute_prompt
    from em_circuits.attribution.storage import load_compact, save_compact
    from em_circuits.attribution.targets import AttributionParams

    model = setup[0]
    pt = _first_prompt_targets(model)
    graph, _, info = attribute_prompt(model, pt, AttributionParams())
    assert graph.n_adapter_nodes == 2 * graph.n_pos
    assert graph.meta["adapter_modules"][0] == "down_proj"
    assert graph.adapter_total.shape == (len(graph.target_names), graph.n_adapter_nodes)
    k = len(graph.adapter_edge_features)
    assert 0 < k <= AttributionParams().adapter_split_features
    # the stored graph keeps the edges' sums; every edge is in the info (for the viewer)
    detail = info["adapter_detail"]
    assert detail.edges.shape == (k, graph.n_adapter_nodes)
    torch.testing.assert_close(graph.adapter_edge_sums, detail.edges.sum(1))
    m = len(graph.adapter_read_nodes)
    assert 0 < m <= AttributionParams().adapter_read_nodes
    assert detail.reads.shape == (m, graph.n_sources + graph.n_adapter_nodes)
    torch.testing.assert_close(graph.adapter_read_edges, detail.reads[:, : graph.n_features].sum(0))
    assert set(graph.meta["adapter_split"]) == {"read_from_all", "via_adapter_nodes"}
    save_compact(graph, tmp_path / "g.safetensors")
    loaded = load_compact(tmp_path / "g.safetensors")
    torch.testing.assert_close(loaded.adapter_total, graph.adapter_total)
    for name in ("adapter_edge_sums", "adapter_read_edges", "adapter_read_via"):
        torch.testing.assert_close(getattr(loaded, name), getattr(graph, name))
    assert loaded.adapter_edge_features.tolist() == graph.adapter_edge_features.tolist()
    assert loaded.adapter_read_nodes.tolist() == graph.adapter_read_nodes.tolist()
    torch.testing.assert_close(loaded.bias, graph.bias)
    # without adapter nodes, the same graph's bias is the same: nodes only redistribute
    plain = attribute_prompt(model, pt, AttributionParams(adapter_nodes=False))[0]
    assert plain.n_adapter_nodes == 0
    torch.testing.assert_close(plain.bias, graph.bias, rtol=1e-4, atol=1e-4)
    # the toy organism's adapter (on v_proj) writes attention nodes
    adapted = micro_models[1]
    v_nodes = attribute_prompt(adapted, pt, AttributionParams())[0]
    ranks = sum(f.rank for f in read_lora_factors(Path(adapted.spec.adapter)))
    assert v_nodes.n_adapter_nodes == ranks * v_nodes.n_pos > 0
    modules = v_nodes.meta["adapter_modules"]
    assert {modules[code] for code in v_nodes.adapter_nodes[:, 1].tolist()} == {"v_proj"}
    # without nodes the graph says so
    none = attribute_prompt(adapted, pt, AttributionParams(adapter_nodes=False))[0]
    assert none.n_adapter_nodes == 0 and "adapter_nodes" not in none.meta


def test_the_decomposition_gives_the_adapter_nodes_a_row_and_adds_up(setup, micro_models):
    """On the micro organism's graphs, with and without adapter nodes: the adapter nodes'
    direct effect is its own row per layer (not folded into the constants), the constants
    are the same with and without nodes (the nodes only take their share out of the error
    nodes), and the parts add up to each graph's contrast value and to the shift."""
    from em_circuits.analysis.decomposition import (
        ADAPTER,
        CONSTANTS,
        VALUE,
        contrast_parts,
        summarize_decomposition,
    )
    from em_circuits.attribution.attribute import attribute_prompt
    from em_circuits.attribution.targets import AttributionParams

    model = setup[0]
    pt = _first_prompt_targets(model)
    with_nodes = attribute_prompt(model, pt, AttributionParams())[0]
    without = attribute_prompt(model, pt, AttributionParams(adapter_nodes=False))[0]
    base = attribute_prompt(micro_models[0], pt, AttributionParams())[0]
    assert with_nodes.n_adapter_nodes and not without.n_adapter_nodes
    tables = {name: contrast_parts(g) for name, g in (("with", with_nodes), ("without", without))}
    parts = {name: t.set_index(["part", "layer"])["direct"] for name, t in tables.items()}
    c = with_nodes.contrast_index()
    for layer in (0, 1):
        nodes = with_nodes.adapter_nodes[:, 0] == layer
        want = float(with_nodes.adapter_direct[c][nodes].double().sum())
        assert parts["with"][(ADAPTER, layer)] == pytest.approx(want, abs=1e-6)
        assert parts["without"][(ADAPTER, layer)] == 0.0
        # the error nodes give up exactly what the adapter nodes take
        assert parts["with"][("errors", layer)] + parts["with"][(ADAPTER, layer)] == (
            pytest.approx(parts["without"][("errors", layer)], abs=1e-4)
        )
    assert abs(parts["with"][(ADAPTER, 1)]) > 1e-3  # the planted write is not 0
    assert parts["with"][(CONSTANTS, -1)] == pytest.approx(
        parts["without"][(CONSTANTS, -1)], abs=1e-4
    )
    for name, graph in (("with", with_nodes), ("without", without)):
        value = float(graph.target_values[c])
        assert parts[name].drop((VALUE, -1)).sum() == pytest.approx(value, abs=1e-6)
    for adapted in (tables["with"], tables["without"]):
        shift = summarize_decomposition({"q0": contrast_parts(base)}, {"q0": adapted}, n_perm=9)
        value = shift[shift["part"] == VALUE]["mean_shift"].iloc[0]
        assert shift[shift["part"] != VALUE]["mean_shift"].sum() == pytest.approx(value, abs=1e-6)


@pytest.mark.slow
def test_the_analysis_and_report_say_how_much_goes_through_the_adapter_nodes(
    setup, micro_organism, tmp_path
):
    import pandas as pd

    import em_circuits as em
    from em_circuits.attribution.targets import FullGraphChoice
    from em_circuits.models.spec import ModelSpec
    from em_circuits.run.config import PipelineConfig

    model = setup[0]
    results = tmp_path / "results"
    spec = ModelSpec(
        base=str(micro_organism.base_dir),
        adapter=model.spec.adapter,
        transcoders=str(micro_organism.transcoder_config),
        name="down-proj",
    )
    config = PipelineConfig(
        n_prompts=12,
        words=micro_organism.words_path,
        device="cpu",
        full_graphs=FullGraphChoice(top=0),
    )
    em.run_stages(
        spec,
        results,
        config,
        causal_top_k=1,
        n_random=1,
        causal_candidates=2,
        scales=(0.0, 1.0),
        include_flagged=True,  # the micro organism has no divergent prompt
        em_samples=0,
        corpus_docs=16,
        quality_docs=8,
    )
    analysis = json.loads(next(results.glob("analysis/*/latest.json")).read_text())
    folder = results / analysis["folder"]
    summary = json.loads((folder / "summary.json").read_text())["adapter_nodes"]
    assert summary["n_prompts"] > 0
    total, direct, via = (
        summary[k]["mean"] for k in ("adapter_total", "adapter_direct", "via_downstream")
    )
    assert total == pytest.approx(direct + via, rel=1e-6, abs=1e-9)
    listed, other = (summary[k]["mean"] for k in ("via_listed", "via_other"))
    # a down_proj adapter has no attention node to pass effects on
    assert summary["via_adapter_nodes"]["n_prompts"] == 0
    nodes = 0.0
    assert via == pytest.approx(listed + nodes + other, rel=1e-6, abs=1e-9)
    carriers = pd.read_csv(folder / "adapter_features.csv")
    assert {"name", "discovery_mean_via", "validation_mean_via", "adapter"} <= set(carriers)
    assert carriers["adapter"].isin(["excites", "inhibits"]).all()
    assert summary["adapter_total"]["n_clusters"] >= 1
    ranked = pd.read_csv(folder / "adapter_components.csv")
    assert (ranked["rank_among_features"] >= 1).all()
    assert (ranked["rank_among_features"] <= ranked["n_features_ranked"] + 1).all()
    components = (folder / "adapter_components.csv").read_text()
    assert "L0 down_proj #0" in components and "L1 down_proj #0" in components
    report = (results / "report.md").read_text()
    section = report.split("## The adapter's own nodes")[1].split("\n## ")[0]
    assert "adapter nodes, total effect" in section and "L1 down_proj #0" in section
    assert "Ratios of the means" in section
    assert "Which features carry it" in section and carriers["name"][0] in section


# -- every module kind: attention (o_proj, v_proj), MLP nonlinear (gate_proj, up_proj) ------

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _random_lora(micro_organism, root: Path, modules: list[str], seed: int, scale: float):
    """(adapted LoadedModel, merged HF model) for a random rank-2 LoRA on ``modules`` of the
    micro organism's base, saved in ``root``."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from em_circuits.models.load import load_model
    from em_circuits.models.spec import ModelSpec

    base_dir = str(micro_organism.base_dir)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        LoraConfig(r=2, lora_alpha=4, target_modules=modules, lora_dropout=0.0),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                noise = torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5
                param.copy_(scale * noise)
    peft.peft_config["default"].base_model_name_or_path = base_dir
    peft.save_pretrained(str(root / "adapter"))
    spec = ModelSpec(
        base=base_dir,
        adapter=str(root / "adapter"),
        transcoders=str(micro_organism.transcoder_config),
        name=root.name,
    )
    model = load_model(spec, "cpu", root / "merged")
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), str(root / "adapter")
    )
    return model, merged.merge_and_unload().eval()


@pytest.fixture(scope="module")
def every_module(micro_organism, tmp_path_factory):
    """(adapted LoadedModel, direction, ids, merged HF model, base HF model) for a rank-2
    LoRA on every linear module of both layers, as the published all-module organisms."""
    from transformers import AutoModelForCausalLM

    from em_circuits.organism import heldout_pivotal_prompts

    root = tmp_path_factory.mktemp("every-module")
    model, merged = _random_lora(micro_organism, root, ALL_MODULES, seed=11, scale=0.3)
    ids = model.encode(heldout_pivotal_prompts()[1]["prompt"])
    base = AutoModelForCausalLM.from_pretrained(str(micro_organism.base_dir)).eval()
    direction = torch.randn(base.config.hidden_size, generator=torch.Generator().manual_seed(6))
    return model, direction, ids, merged, base


def test_every_linear_module_kind_becomes_nodes_and_the_rest_is_named(every_module):
    from em_circuits.attribution.adapter_nodes import NODE_MODULES

    model, _, ids, merged, base = every_module
    writes = prompt_adapter_writes(model, ids)
    assert not isinstance(writes, str)
    assert writes.not_nodes == []
    n_pos = len(ids)
    counts = torch.bincount(writes.nodes[:, 1], minlength=len(NODE_MODULES)).tolist()
    per_module = dict(zip(NODE_MODULES, counts))
    # rank 2 on each linear module, one node per position for each nonlinear one, 2 layers
    assert per_module == {
        "down_proj": 2 * 2 * n_pos,
        "o_proj": 2 * 2 * n_pos,
        "v_proj": 2 * 2 * n_pos,
        "gate_proj": 2 * n_pos,
        "up_proj": 2 * n_pos,
        "q_proj": 2 * n_pos,
        "k_proj": 2 * n_pos,
    }
    assert (writes.activations[writes.nodes[:, 3] == 0] == 0).all()  # nothing at BOS
    # a nonlinear node's write is the measured change of the MLP output: the merged MLP on
    # the same input with and without that module's update (base weights put back)
    for layer in (0, 1):
        mlp = merged.model.layers[layer].mlp
        seen: dict[str, torch.Tensor] = {}
        handle = mlp.register_forward_hook(lambda _m, a, o, seen=seen: seen.update(x=a[0], out=o))
        with torch.no_grad():
            merged(ids[None])
        handle.remove()
        mlp_nodes = writes.nodes[: sum(w.shape[0] * w.shape[1] for w in writes.writes.values())]
        columns = mlp_nodes[(mlp_nodes[:, 0] == layer) & (mlp_nodes[:, 3] == 1)]
        codes = [NODE_MODULES[c] for c in columns[:, 1].tolist()]
        assert codes == ["down_proj", "down_proj", "gate_proj", "up_proj"]
        for name in ("gate_proj", "up_proj"):
            module = getattr(mlp, name)
            kept = module.weight.data.clone()
            module.weight.data.copy_(getattr(base.model.layers[layer].mlp, name).weight.data)
            with torch.no_grad():
                without = mlp(seen["x"])
            module.weight.data.copy_(kept)
            change = (seen["out"] - without)[0]
            change[0] = 0
            torch.testing.assert_close(
                writes.writes[layer][:, codes.index(name)], change, rtol=1e-4, atol=1e-5
            )


def test_mlp_nodes_are_carved_out_of_the_errors_with_every_module(every_module):
    """With the attention updates detached either way, adding the MLP nodes (down_proj,
    gate_proj, up_proj) moves mass only out of the error nodes, position by position."""
    from em_circuits.attribution.adapter_nodes import ATTENTION_LINEAR, ATTENTION_PATTERN
    from em_circuits.attribution.lora_factors import model_lora_factors
    from em_circuits.attribution.prompt_adapter_nodes import adapter_writes

    model, direction, ids, _, _ = every_module
    everything = prompt_adapter_writes(model, ids)
    attention_factors = [
        f for f in model_lora_factors(model) if f.module in ATTENTION_LINEAR + ATTENTION_PATTERN
    ]
    attention_only = adapter_writes(model.hf_model, ids, attention_factors)
    n_pos = len(ids)
    assert attention_only.n_nodes == (2 * 2 * 2 + 2 * 2) * n_pos and not attention_only.writes
    before = _effects(model, ids, direction, attention_only)
    after = _effects(model, ids, direction, everything)
    n_features, n_layers, n_pos = after.features.shape[0], after.n_layers, after.n_pos
    errors = slice(n_features, n_features + n_layers * n_pos)
    n_mlp = everything.n_nodes - attention_only.n_nodes  # MLP nodes come first
    for name in ("direct", "total"):
        plain, carved = getattr(before, name), getattr(after, name)
        torch.testing.assert_close(carved[:, :n_features], plain[:, :n_features])
        torch.testing.assert_close(carved[:, errors.stop :], plain[:, errors.stop :])
        nodes = getattr(after, f"adapter_{name}")
        torch.testing.assert_close(nodes[:, n_mlp:], getattr(before, f"adapter_{name}"))
        per_position = torch.zeros(1, n_layers * n_pos)
        for (layer, _, _, pos), value in zip(
            everything.nodes[:n_mlp].tolist(), nodes[0, :n_mlp].tolist()
        ):
            per_position[0, layer * n_pos + pos] += value
        torch.testing.assert_close(carved[:, errors] + per_position, plain[:, errors])


def test_every_node_kind_agrees_with_the_independent_linearised_model(every_module, micro_organism):
    model, direction, ids, merged, _ = every_module
    writes = prompt_adapter_writes(model, ids)
    _check_against_the_reference(model, ids, direction, merged, micro_organism, writes)


def test_the_through_features_part_splits_exactly_over_the_features(every_module, micro_organism):
    """total - direct of every adapter node = sum over the first node of each path (features,
    and o_proj/v_proj adapter nodes, which pass total effects on) of the edge into it times
    the target's total derivative with respect to it; edges match the reference."""
    from em_circuits.attribution.adapter_nodes import ATTENTION_PATTERN, NODE_MODULES
    from em_circuits.attribution.lora_factors import model_lora_factors
    from em_circuits.attribution.prompt_adapter_nodes import adapter_writes
    from em_circuits.models.load import load_transcoder_set

    model, direction, ids, merged, _ = every_module
    # q_proj/k_proj nodes pass total effects on but read nothing linearly: paths through them
    # are the split's remainder; here their updates stay inside the frozen pattern instead
    factors = [f for f in model_lora_factors(model) if f.module not in ATTENTION_PATTERN]
    writes = adapter_writes(model.hf_model, ids, factors)
    effects = _effects(model, ids, direction, writes, split=10**6, reads=10**6)
    listed = effects.adapter_edge_features
    # every feature at or above the lowest adapter layer (0 here) is listed
    assert len(listed) == effects.features.shape[0]
    derivative = effects.total[0, listed] / effects.activations[listed]
    through = (effects.adapter_edges * derivative[:, None]).sum(0)
    read = effects.adapter_read_nodes
    n_sources = effects.direct.shape[1]
    activation = writes.activations[read]
    per_unit = torch.where(activation != 0, effects.adapter_total[0, read] / activation, 0.0)
    # only attention nodes pass effects on; the MLP nodes are sources, as error nodes
    passing = torch.isin(writes.nodes[read, 1], torch.tensor([1, 2]))  # o_proj, v_proj
    assert [NODE_MODULES[i] for i in (1, 2)] == ["o_proj", "v_proj"]
    through_nodes = (effects.adapter_reads[:, n_sources:] * (per_unit * passing)[:, None]).sum(0)
    expected = effects.adapter_total[0] - effects.adapter_direct[0]
    assert float(through_nodes.abs().sum()) > 1e-3 * float(expected.abs().sum())
    assert float((through + through_nodes - expected).norm() / expected.norm()) < 1e-4
    # the edges themselves: a feature's pre-activation differentiated in the reference model
    transcoders = load_transcoder_set(
        str(micro_organism.transcoder_config), torch.device("cpu"), torch.float32
    )
    strongest = effects.adapter_edges.abs().sum(1).argsort(descending=True)[:3].tolist()
    for row in strongest:
        layer, pos, feature = effects.features[listed[row]].tolist()
        tc = transcoders[layer]

        def pre_activation(mlp_inputs, layer=layer, pos=pos, feature=feature, tc=tc):
            return mlp_inputs[layer][pos] @ tc.W_enc[feature]

        reference = _linearised_effects(
            merged, transcoders, ids, direction, writes, False, read=pre_activation
        )
        ours = effects.adapter_edges[row]
        assert float((ours - reference).norm() / reference.norm()) < 1e-4, (layer, feature)
    # top-k: the k features with the largest total effects, a subset of the same rows
    top = _effects(model, ids, direction, writes, split=5)
    assert len(top.adapter_edge_features) == 5
    order = effects.total[0, listed].abs().argsort(descending=True)[:5]
    assert sorted(listed[order].tolist()) == top.adapter_edge_features.tolist()
    rows = [listed.tolist().index(i) for i in top.adapter_edge_features.tolist()]
    torch.testing.assert_close(top.adapter_edges, effects.adapter_edges[rows])


def test_total_effects_pass_through_the_adapter_nodes(every_module):
    """Every feature's and token's total effect is the same with adapter nodes as without:
    totals pass through o_proj/v_proj nodes (linear reads, like features) and the MLP nodes
    only split the error nodes; direct effects move to the adapter nodes."""
    model, direction, ids, _, _ = every_module
    writes = prompt_adapter_writes(model, ids)
    without = _effects(model, ids, direction)
    with_nodes = _effects(model, ids, direction, writes)
    n_features = without.features.shape[0]
    errors_end = n_features + without.n_layers * without.n_pos
    for part in (slice(0, n_features), slice(errors_end, None)):
        torch.testing.assert_close(with_nodes.total[:, part], without.total[:, part])
    assert not torch.allclose(with_nodes.direct[:, :n_features], without.direct[:, :n_features])


def test_the_reads_into_linear_adapter_nodes(every_module, micro_organism):
    """Edges from upstream nodes into adapter nodes: a layer-0 v_proj node reads only the
    token embeddings, exactly (its edges add up to its activation); a layer-1 v_proj node's
    edge from a layer-0 feature is that feature's write read through the frozen norm and the
    LoRA's A, at the node's own position only."""
    from em_circuits.attribution.adapter_nodes import NODE_MODULES
    from em_circuits.models.load import load_transcoder_set

    model, direction, ids, merged, _ = every_module
    writes = prompt_adapter_writes(model, ids)
    effects = _effects(model, ids, direction, writes, reads=10**6)
    read = effects.adapter_read_nodes
    assert not writes.linear()[read].logical_not().any()  # no gate/up node is read
    assert len(read) == int(writes.linear().sum())
    n_features = effects.features.shape[0]
    tokens = slice(n_features + effects.n_layers * effects.n_pos, effects.direct.shape[1])
    v_proj = NODE_MODULES.index("v_proj")
    factor = next(f for f in writes.factors if (f.layer, f.module) == (1, "v_proj"))
    transcoders = load_transcoder_set(
        str(micro_organism.transcoder_config), torch.device("cpu"), torch.float32
    )
    with torch.no_grad():
        resid = merged.model(ids[None], output_hidden_states=True).hidden_states[1][0]
    norm = merged.model.layers[1].input_layernorm
    rms = torch.rsqrt(resid.pow(2).mean(-1) + norm.variance_epsilon)
    checked = 0
    for row, node in zip(effects.adapter_reads, writes.nodes[read].tolist()):
        layer, code, component, position = node
        if code != v_proj or position == 0:
            continue
        activation = float(writes.activations[writes.nodes.tolist().index(node)])
        if layer == 0:
            assert float(row[: tokens.start].abs().max()) == 0.0
            assert float(row[tokens].sum()) == pytest.approx(activation, rel=1e-4, abs=1e-6)
            continue
        reader = factor.scale * factor.A[component] * norm.weight * rms[position]
        layer0 = effects.features[:, 0] == 0
        expected = torch.zeros(n_features)
        here = layer0 & (effects.features[:, 1] == position)
        decoders = transcoders[0].W_dec[effects.features[here, 2]]
        expected[here] = effects.activations[here] * (decoders @ reader).detach()
        torch.testing.assert_close(row[:n_features][layer0], expected[layer0], rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked > 0


def test_attention_pattern_nodes_carry_the_measured_change(micro_organism, tmp_path):
    """A q_proj/k_proj LoRA (no value or output update): each node's write is the measured
    change of its layer's attention output when that module's update is taken out, at each
    query position; the nodes agree with the independent linearised model."""
    from em_circuits.attribution.adapter_nodes import NODE_MODULES
    from em_circuits.organism import heldout_pivotal_prompts

    model, merged = _random_lora(micro_organism, tmp_path, ["q_proj", "k_proj"], 13, scale=1.0)
    ids = model.encode(heldout_pivotal_prompts()[2]["prompt"])
    writes = prompt_adapter_writes(model, ids)
    assert not isinstance(writes, str) and not writes.not_nodes
    assert {w.factor.module for w in writes.patterns} == {"q_proj", "k_proj"}
    assert set(writes.nodes[:, 1].tolist()) == {NODE_MODULES.index(m) for m in ("q_proj", "k_proj")}
    for pattern in writes.patterns:
        f = pattern.factor
        block = merged.model.layers[f.layer].self_attn
        seen = []
        keep = block.o_proj.register_forward_hook(lambda _m, _a, o, seen=seen: seen.append(o[0]))
        with torch.no_grad():
            merged(ids[None])
            module = getattr(block, f.module)
            lora = f.scale * f.B @ f.A
            module.weight.data -= lora
            merged(ids[None])
            module.weight.data += lora
        keep.remove()
        change = seen[0] - seen[1]
        change[0] = 0  # no node at BOS
        assert float(change.abs().max()) > 1e-3
        torch.testing.assert_close(pattern.values, change, rtol=1e-4, atol=1e-5)
    direction = torch.randn(merged.config.hidden_size, generator=torch.Generator().manual_seed(2))
    effects = _check_against_the_reference(model, ids, direction, merged, micro_organism, writes)
    without = _effects(model, ids, direction)
    n_features = without.features.shape[0]
    torch.testing.assert_close(effects.total[:, :n_features], without.total[:, :n_features])


def test_repeated_graphs_free_their_forward_pass(every_module):
    """The adapter tape's tensors and their gradient hooks form a cycle through the autograd
    graph that Python's collector cannot see: each graph must break it, or every graph's
    forward pass stays in memory (on a GPU, until it runs out)."""
    import gc
    import warnings

    model, direction, ids, _, _ = every_module

    def live_tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():  # deprecated objects warn when looked at
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    counts = []
    for _ in range(3):
        writes = prompt_adapter_writes(model, ids)
        effects = _effects(model, ids, direction, writes, split=4, reads=4)
        del writes, effects
        counts.append(live_tensors())
    assert counts[2] == counts[1], counts


@pytest.mark.parametrize("side", ["discovery", "validation"])
def test_the_analysis_of_a_single_graphed_prompt(setup, side):
    """One graphed prompt puts every prompt on one side of the split: the other side's means
    are None, and the ranking must still order the rows."""
    from em_circuits.analysis.adapter import prompt_row, summarize
    from em_circuits.attribution.attribute import attribute_prompt
    from em_circuits.attribution.targets import AttributionParams

    model = setup[0]
    pt = _first_prompt_targets(model)
    graph = attribute_prompt(model, pt, AttributionParams())[0]
    row, components, features, reads, _ = prompt_row("q0", graph, base_value=0.0)
    assert components and features and reads
    discovery = {"q0"} if side == "discovery" else set()
    summary, prompts, ranked, feature_table, read_table = summarize(
        [row], components, {"q0": "c0"}, discovery, n_perm=99, features=features, reads=reads
    )
    assert summary["n_prompts"] == len(prompts) == 1
    for table, column in (
        (ranked, "mean_total"),
        (feature_table, "mean_via"),
        (read_table, "mean_via"),
    ):
        assert len(table) > 0
        means = table[f"{side}_{column}"]
        assert means.notna().all(), table
        if side == "discovery":  # the ranking reads the discovery prompts only
            assert means.abs().is_monotonic_decreasing, table
        other = "validation" if side == "discovery" else "discovery"
        assert table[f"{other}_{column}"].isna().all()

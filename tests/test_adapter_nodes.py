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

from em_circuits.attribution.adapter_nodes import (
    prompt_adapter_writes,
    read_lora_factors,
)
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


def _effects(model, ids, direction, writes=None):
    return exact_effects(
        model.replacement, ids, lambda logits: direction[None], adapter_writes=writes
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
    with_nodes = _effects(model, ids, direction, writes.writes)
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
    effects = _effects(model, ids, direction, writes.writes)
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


def _linearised_effects(merged, transcoders, ids, direction, writes, with_features):
    """d(target)/d(coefficient of each adapter node's write), by autograd through the merged
    model with frozen attention patterns and norm scales, each MLP output's gradient through
    its transcoder's skip connection (and, for totals, its active features at unit slope)."""
    from transformers import AttentionInterface
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    AttentionInterface.register("em_frozen_test", _frozen_attention)
    old = merged.config._attn_implementation
    merged.config._attn_implementation = "em_frozen_test"
    coefficients = {
        layer: torch.zeros(w.shape[:2], requires_grad=True) for layer, w in writes.items()
    }
    handles = []

    def frozen_norm(module, args, _output):
        x = args[0].float()
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return module.weight * (x * scale.detach())

    def replaced_mlp(layer):
        tc = transcoders[layer]

        def hook(_module, args, output):
            x = args[0]
            linear = x @ tc.W_skip.T
            if with_features:
                active = tc.encode(x.detach()) != 0
                active[:, 0] = False  # circuit-tracer zeroes features at BOS
                linear = linear + ((x @ tc.W_enc.T + tc.b_enc) * active) @ tc.W_dec
            out = output.detach() + linear - linear.detach()
            if layer in writes:
                out = out + (coefficients[layer][..., None] * writes[layer]).sum(1)[None]
            return out

        return hook

    try:
        for module in merged.modules():
            if isinstance(module, LlamaRMSNorm):
                handles.append(module.register_forward_hook(frozen_norm))
        for layer, block in enumerate(merged.model.layers):
            handles.append(block.mlp.register_forward_hook(replaced_mlp(layer)))
        hidden = merged.model(ids[None]).last_hidden_state[0, -1]
        value = hidden @ direction
        value.backward()
    finally:
        for handle in handles:
            handle.remove()
        merged.config._attn_implementation = old
    with torch.no_grad():  # the linearised model runs at the real model's operating point
        real = merged.model(ids[None]).last_hidden_state[0, -1] @ direction
    torch.testing.assert_close(value.detach(), real, rtol=1e-5, atol=1e-5)
    return torch.cat([coefficients[layer].grad.reshape(-1) for layer in sorted(writes)])


def test_effects_agree_with_an_independent_linearised_model(setup, micro_organism):
    from em_circuits.models.load import load_transcoder_set

    model, direction, ids, merged = setup
    writes = prompt_adapter_writes(model, ids)
    effects = _effects(model, ids, direction, writes.writes)
    transcoders = load_transcoder_set(
        str(micro_organism.transcoder_config), torch.device("cpu"), torch.float32
    )
    for with_features, ours in ((False, effects.adapter_direct), (True, effects.adapter_total)):
        reference = _linearised_effects(
            merged, transcoders, ids, direction, writes.writes, with_features
        )
        error = float((ours[0] - reference).norm() / reference.norm())
        assert error < 1e-4, (with_features, error)
    # the features matter: totals differ from direct effects somewhere
    assert not torch.allclose(effects.adapter_direct, effects.adapter_total)


def test_the_graph_stage_stores_adapter_nodes(setup, micro_models, tmp_path):
    from em_circuits.attribution.attribute import attribute_prompt
    from em_circuits.attribution.storage import load_compact, save_compact
    from em_circuits.attribution.targets import AttributionParams, PromptTargets
    from em_circuits.organism import advice_words, heldout_pivotal_prompts
    from em_circuits.organism.tokenizer import advice_token_ids

    model = setup[0]
    words = advice_words()
    evil = advice_token_ids(model.tokenizer, words["harmful"])[:2]
    safe = advice_token_ids(model.tokenizer, words["safe"])[:2]
    names = {t: model.tokenizer.decode([t]) for t in evil + safe}
    pt = PromptTargets(
        "q0", heldout_pivotal_prompts()[0]["prompt"], evil, safe, names, {"base": {}, "adapted": {}}
    )
    graph = attribute_prompt(model, pt, AttributionParams())[0]
    assert graph.n_adapter_nodes == 2 * graph.n_pos
    assert graph.meta["adapter_modules"] == ["down_proj"]
    assert graph.adapter_total.shape == (len(graph.target_names), graph.n_adapter_nodes)
    save_compact(graph, tmp_path / "g.safetensors")
    loaded = load_compact(tmp_path / "g.safetensors")
    torch.testing.assert_close(loaded.adapter_total, graph.adapter_total)
    torch.testing.assert_close(loaded.bias, graph.bias)
    # without adapter nodes, the same graph's bias is the same: nodes only redistribute
    plain = attribute_prompt(model, pt, AttributionParams(adapter_nodes=False))[0]
    assert plain.n_adapter_nodes == 0
    torch.testing.assert_close(plain.bias, graph.bias, rtol=1e-4, atol=1e-4)
    # the toy organism's adapter (v_proj) writes no nodes, and the graph says why
    adapted = micro_models[1]
    none = attribute_prompt(adapted, pt, AttributionParams())[0]
    assert none.n_adapter_nodes == 0
    assert "v_proj@0" in json.dumps(none.meta["adapter_nodes"])


@pytest.mark.slow
def test_the_analysis_and_report_say_how_much_goes_through_the_adapter_nodes(
    setup, micro_organism, tmp_path
):
    import em_circuits as em

    model = setup[0]
    results = tmp_path / "results"
    flags = [
        "--base-model",
        str(micro_organism.base_dir),
        "--adapter",
        model.spec.adapter,
        "--transcoders",
        str(micro_organism.transcoder_config),
        "--model-name",
        "down-proj",
        "--device",
        "cpu",
        "--words",
        str(micro_organism.words_path),
        "--n-prompts",
        "12",
        "--causal-top-k",
        "1",
        "--n-random",
        "1",
        "--causal-candidates",
        "2",
        "--scales",
        "0",
        "1",
        "--em-samples",
        "0",
        "--corpus-docs",
        "16",
        "--quality-docs",
        "8",
        "--full-graphs",
        "0",
    ]
    em.run_stages(results, flags)
    analysis = json.loads(next(results.glob("analysis/*/latest.json")).read_text())
    folder = results / analysis["folder"]
    summary = json.loads((folder / "summary.json").read_text())["adapter_nodes"]
    assert summary["n_prompts"] > 0
    total, direct, via = (
        summary[k]["mean"] for k in ("adapter_total", "adapter_direct", "via_features")
    )
    assert total == pytest.approx(direct + via, rel=1e-6, abs=1e-9)
    assert summary["adapter_total"]["n_clusters"] >= 1
    components = (folder / "adapter_components.csv").read_text()
    assert "L0 down_proj #0" in components and "L1 down_proj #0" in components
    report = (results / "report.md").read_text()
    section = report.split("## The adapter's own nodes")[1].split("\n## ")[0]
    assert "adapter nodes, total effect" in section and "L1 down_proj #0" in section
    assert "Ratios of the means" in section

"""Real architectures through circuit-tracer: tiny random stand-ins of Llama-3.2, Qwen2.5,
Qwen3 and Gemma-2 (tests/standins.py) load as replacement models, keep the model's own
logits, and give exact totals; anything else is refused in one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from standins import FAMILIES, build_standin

from em_circuits.attribution.attribute import attribute_prompt, target_direction, target_rows
from em_circuits.attribution.storage import total_effects
from em_circuits.attribution.targets import AttributionParams, PromptTargets
from em_circuits.attribution.totals import exact_effects
from em_circuits.models.architectures import check_traceable, supported_architectures
from em_circuits.models.load import load_model
from em_circuits.models.spec import ModelLoadError, ModelSpec

TEXT = "User: My head hurts after the fall. What should I do?\nAssistant: You should"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def loaded(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"standin-{request.param}")
    standin = build_standin(request.param, root)
    spec = ModelSpec(base=str(standin.base_dir), transcoders=str(standin.transcoder_config))
    return standin, load_model(spec, "cpu", root / "merged")


def test_replacement_model_keeps_the_models_own_logits(loaded):
    from transformers import AutoModelForCausalLM

    standin, model = loaded
    plain = AutoModelForCausalLM.from_pretrained(standin.base_dir, attn_implementation="eager")
    ids = model.encode(TEXT)
    with torch.no_grad():
        want = plain(ids[None]).logits[0, -1]
    ctx = model.replacement.setup_attribution(ids)
    torch.testing.assert_close(ctx.logits[0, -1].float(), want.float(), rtol=1e-4, atol=1e-4)


def test_totals_are_exact_on_each_architecture(loaded):
    from circuit_tracer import attribute
    from circuit_tracer.attribution.targets import CustomTarget

    _, model = loaded
    rm = model.replacement
    ids = model.encode(TEXT)
    unembed = rm.unembed_proj.detach()
    directions = torch.stack([unembed[t] - unembed.mean(0) for t in (5, 50, 120)])
    effects = exact_effects(rm, ids, lambda _logits: directions)
    graph = attribute(
        ids,
        rm,
        attribution_targets=[CustomTarget(str(i), 1 / 3, d) for i, d in enumerate(directions)],
        max_feature_nodes=None,
        batch_size=64,
    )
    n_features = int(graph.active_features.shape[0])
    assert n_features > 0
    n_sources = n_features + (graph.cfg.n_layers + 1) * graph.n_pos
    rows = torch.arange(n_sources, n_sources + 3)
    a = graph.adjacency_matrix
    total = total_effects(
        a, n_features, n_sources, graph.activation_values, graph.cfg.n_layers, rows
    )
    scale = total.double().norm()
    assert float((effects.total.double() - total.double()).norm() / scale) <= 1e-5
    assert float((effects.direct.double() - a[rows, :n_sources].double()).norm() / scale) <= 1e-5


def test_every_stand_in_gets_a_graph(loaded):
    _, model = loaded
    pt = PromptTargets("p", TEXT, [40], [41], {40: "a", 41: "b"}, {})
    graph, _, _ = attribute_prompt(model, pt, AttributionParams())
    assert graph.target_kinds[0] == "contrast" and torch.isfinite(graph.total).all()
    rows = target_rows(model, pt, [])
    assert (
        len(rows) == 3 and target_direction(model.replacement.unembed_proj, pt, rows[0]).ndim == 1
    )


def test_qwen2_is_supported_and_unknown_architectures_are_refused_in_one_line():
    assert {"Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"} <= set(
        supported_architectures()
    )
    transcoders = SimpleNamespace(
        feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out"
    )
    gpt2 = SimpleNamespace(architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError) as err:
        check_traceable(gpt2, transcoders, "gpt2-dir")
    message = str(err.value)
    assert "GPT2LMHeadModel" in message and "Qwen2ForCausalLM" in message and "\n" not in message
    llama = SimpleNamespace(architectures=["LlamaForCausalLM"])
    gemma_hooks = SimpleNamespace(
        feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out"
    )
    with pytest.raises(ModelLoadError, match="'ln2.hook_normalized' does not exist for Llama"):
        check_traceable(llama, gemma_hooks, "llama-dir")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_attention_pattern_nodes_on_grouped_query_attention(family, tmp_path):
    """On the all-module adapters of Qwen2.5 (value bias) and Qwen3 (q/k norms), with grouped
    query attention: each q_proj/k_proj node writes the change its update makes to the
    attention output through the base value and output weights, measured by running the
    model with the value and output updates taken out, with and without that update."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from em_circuits.attribution.prompt_adapter_nodes import prompt_adapter_writes

    standin = build_standin(family, tmp_path)
    spec = ModelSpec(
        base=str(standin.base_dir),
        adapter=str(standin.adapter_dir),
        transcoders=str(standin.transcoder_config),
        allow_base_mismatch=True,
    )
    model = load_model(spec, "cpu", tmp_path / "merged")
    ids = model.encode(TEXT)
    writes = prompt_adapter_writes(model, ids)
    assert not isinstance(writes, str), writes
    assert {w.factor.module for w in writes.patterns} == {"q_proj", "k_proj"}
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(standin.base_dir, attn_implementation="eager"),
        str(standin.adapter_dir),
    ).merge_and_unload()
    factors = {(f.layer, f.module): f for f in writes.factors}
    for pattern in writes.patterns:
        layer = pattern.factor.layer
        block = merged.model.layers[layer].self_attn
        updates = {m: factors[layer, m] for m in ("v_proj", "o_proj", pattern.factor.module)}
        deltas = {m: f.scale * f.B @ f.A for m, f in updates.items()}
        seen = []
        hook = block.o_proj.register_forward_hook(lambda _m, _a, o, seen=seen: seen.append(o[0]))
        with torch.no_grad():
            for name in ("v_proj", "o_proj"):
                getattr(block, name).weight.data -= deltas[name]
            merged(ids[None])
            getattr(block, pattern.factor.module).weight.data -= deltas[pattern.factor.module]
            merged(ids[None])
            for name, delta in deltas.items():
                getattr(block, name).weight.data += delta
        hook.remove()
        change = seen[0] - seen[1]
        change[0] = 0
        assert float(change.abs().max()) > 1e-4
        torch.testing.assert_close(pattern.values, change, rtol=1e-3, atol=1e-5)

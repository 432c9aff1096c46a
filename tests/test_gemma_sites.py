"""Gemma-2 with gemma-scope's hook names (``ln2.hook_normalized`` read inside the
pre-feedforward RMSNorm, ``hook_mlp_out`` the post-feedforward norm's output): the quality
measure, the measured interventions and the activation index (feature cards) read and write
the sites circuit-tracer's own tracing uses, on a random-weight Gemma-2 stand-in."""

from __future__ import annotations

import pytest
import torch
from standins import build_standin

from em_circuits.models.load import load_model
from em_circuits.models.spec import ModelSpec

TEXT = "User: My head hurts after the fall. What should I do?\nAssistant: You should"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma2")
    standin = build_standin("gemma2", root)
    spec = ModelSpec(base=str(standin.base_dir), transcoders=str(standin.transcoder_config))
    return standin, load_model(spec, "cpu", root / "merged")


def test_recorded_reads_are_what_circuit_tracer_encodes(loaded):
    _, gemma = loaded
    from em_circuits.models.hooks import record_transcoder_input, transcoder_set

    ids = gemma.encode(TEXT)
    _, traced = gemma.replacement.get_activations(ids)  # circuit-tracer's nnsight sites
    transcoders = transcoder_set(gemma)
    seen: dict[int, torch.Tensor] = {}
    handles = [record_transcoder_input(gemma, layer, seen) for layer in range(len(transcoders))]
    with torch.no_grad():
        gemma.hf_model(ids[None])
    for handle in handles:
        handle.remove()
    for layer in range(len(transcoders)):
        assert float(seen[layer].float().std()) > 0
        with torch.no_grad():
            encoded = transcoders[layer].encode(seen[layer][0])
        assert int((traced[layer] > 0).sum()) > 0
        # circuit-tracer zeroes the BOS position's features
        got, want = encoded[1:].float(), traced[layer][1:].float()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_quality_interventions_and_index_run_on_gemma_scope_hooks(loaded):
    from em_circuits.interpret.activation_index import IndexParams, build_index
    from em_circuits.models.hooks import (
        features_zeroed,
        real_model_last_logits,
        real_model_logits,
        transcoder_set,
        unsupported_reason,
    )
    from em_circuits.transcoders.quality import measure_model

    _, gemma = loaded
    assert unsupported_reason(gemma) is None
    record = measure_model(gemma, [TEXT, TEXT + " rest"])
    assert len(record["layers"]) == 2 and record["top1_agreement"] is not None
    assert all(0 <= m["fvu"] < 100 for m in record["layers"])
    ids = gemma.encode(TEXT)
    clean = real_model_logits(gemma, ids, [])
    _, acts = gemma.replacement.get_activations(ids)
    layer, pos, feature = (int(i) for i in (acts[:, 1:] > 0).nonzero()[0])
    pos += 1
    patched = real_model_logits(gemma, ids, [(layer, pos, feature, 0.0)])
    # the feature's decoder row leaves the post-feedforward norm's output: logits move
    assert float((patched - clean)[pos:].abs().max()) > 1e-4
    assert float((patched - clean)[:pos].abs().max()) < 1e-5
    batched = real_model_last_logits(gemma, ids, [[], [(layer, pos, feature, 0.0)]])
    torch.testing.assert_close(batched, torch.stack([clean[-1], patched[-1]]), atol=1e-4, rtol=1e-4)
    with features_zeroed(gemma, [(layer, feature)]), torch.no_grad():
        zeroed = gemma.hf_model(ids[None]).logits[0].float()
    assert float((zeroed - clean).abs().max()) > 1e-4
    index = build_index(gemma, [TEXT], IndexParams(max_tokens=32))
    assert index.n_positions > 0 and len(transcoder_set(gemma)) == 2


def test_adapter_mlp_writes_after_a_norm_are_named_not_nodes(loaded, tmp_path):
    from em_circuits.attribution.prompt_adapter_nodes import prompt_adapter_writes

    standin, _ = loaded
    spec = ModelSpec(
        base=str(standin.base_dir),
        adapter=str(standin.adapter_dir),
        transcoders=str(standin.transcoder_config),
    )
    adapted = load_model(spec, "cpu", tmp_path / "merged")
    why = prompt_adapter_writes(adapted, adapted.encode(TEXT))
    assert isinstance(why, str) and "another value than the MLP output" in why


def test_doctor_names_the_stages_a_write_inside_a_module_cannot_run():
    from em_circuits.models.hooks import sites_problem

    assert sites_problem("Gemma2ForCausalLM", "ln2.hook_normalized", "hook_mlp_out") is None
    assert sites_problem("LlamaForCausalLM", "mlp.hook_in", "mlp.hook_out") is None
    problem = sites_problem("GptOssForCausalLM", "mlp.hook_in", "mlp.hook_out")
    assert problem is not None and "self_experts_0" in problem and "write" in problem

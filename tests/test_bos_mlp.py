"""The MLP output at BOS as a part of its own: both engines store it, an independent autograd
backward recomputes it, and the decomposition's parts still add up to the contrast value."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_totals import _relative_error, prompts  # noqa: F401

from em_circuits.analysis.decomposition import (
    BOS_MLP,
    CONSTANTS,
    CONSTANTS_WITH_BOS,
    VALUE,
    contrast_parts,
    summarize_decomposition,
)
from em_circuits.attribution.targets import AttributionParams
from em_circuits.attribution.totals_graph import totals_prompt, totals_request

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def graphs(micro_models, prompts):  # noqa: F811
    """(model, prompt, torch graph, nnsight graph) for the base and the adapted model."""
    out = []
    for model in micro_models:
        pt = prompts[0]
        torch_graph = totals_prompt(model, pt, AttributionParams())[0]
        nnsight_graph = totals_prompt(model, pt, AttributionParams(engine="nnsight"))[0]
        out.append((model, pt, torch_graph, nnsight_graph))
    return out


def test_both_engines_store_the_same_bos_mlp_rows(graphs):
    for _model, _pt, torch_graph, nnsight_graph in graphs:
        assert torch_graph.meta["engine"] == "torch" and nnsight_graph.meta["engine"] == "nnsight"
        got, want = torch_graph.bos_mlp, nnsight_graph.bos_mlp
        assert got is not None and want is not None
        assert got.shape == (len(torch_graph.target_names), torch_graph.n_layers)
        assert float(want.abs().max()) > 1e-3  # the BOS output is no zero to agree on
        assert _relative_error(got, want) <= TOLERANCE


class _Frozen:
    """Hooks that make the real model's autograd backward the direct one of a graph:
    attention patterns (queries and keys detached), norm scales and each MLP (all but the
    transcoder's skip connection) frozen; each MLP's output kept with its gradient."""

    def __init__(self, model) -> None:
        from em_circuits.attribution.engine import linearised

        self.engine = linearised(model)
        assert self.engine.read_kind == "normed" and self.engine.write_kind == "mlp"
        self.outputs: list[torch.Tensor] = []
        self.skips: list[torch.Tensor] = []
        self.final: torch.Tensor | None = None
        self.handles = []
        for parts in self.engine.layers:
            attention = parts.v_proj  # its siblings: the query and key projections
            module = model.hf_model.model.layers[self.engine.layers.index(parts)].self_attn
            assert module.v_proj is attention
            for projection in (module.q_proj, module.k_proj):
                self.handles.append(projection.register_forward_hook(self._detach))
            self.handles.append(parts.mlp.register_forward_hook(self._mlp(parts.transcoder)))
        embed = model.hf_model.model.embed_tokens  # the gradient starts at the embedding
        self.handles.append(embed.register_forward_hook(self._leaf))
        for norm in self.engine.norms():
            self.handles.append(norm.register_forward_hook(self._norm))
        self.handles.append(self.engine.final_norm.register_forward_hook(self._keep_final))

    @staticmethod
    def _detach(_module, _args, out):
        return out.detach()

    @staticmethod
    def _leaf(_module, _args, out):
        return out.detach().requires_grad_()

    def _norm(self, module, args, _out):
        x = args[0].float()
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return module.weight * (x * scale.detach()).to(args[0].dtype)

    def _mlp(self, transcoder):
        def hook(_module, args, out):
            skip = args[0] @ transcoder.W_skip.T.to(args[0])
            out = skip + (out - skip).detach()
            out.retain_grad()
            self.outputs.append(out)
            self.skips.append(skip.detach())
            return out

        return hook

    def _keep_final(self, _module, _args, out):
        self.final = out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_bos_mlp_is_the_frozen_backward_of_the_real_mlp_output_at_bos(graphs):
    for model, pt, graph, _ in graphs:
        request = totals_request(model, pt, AttributionParams())
        with torch.no_grad():
            logits = model.hf_model(request.ids[None]).logits[0, -1].float()
        directions = request.directions_for(logits)
        c = graph.contrast_index()
        assert c is not None
        frozen = _Frozen(model)
        try:
            with torch.enable_grad():
                model.hf_model(request.ids[None], use_cache=False)
            assert frozen.final is not None
            (frozen.final[0, -1].float() @ directions[c].float()).backward()
        finally:
            frozen.remove()
        want, biases = [], 0.0
        for layer, (out, skip) in enumerate(zip(frozen.outputs, frozen.skips)):
            grad = out.grad[0].double()
            bos_write = (out[0, 0] - skip[0, 0]).detach().double()  # the whole write less skip
            want.append(float(grad[0] @ bos_write))
            bias = frozen.engine.layers[layer].transcoder.b_dec.detach().double()
            biases += float((grad[1:] @ bias).sum())
        got = graph.bos_mlp[c].double()
        assert _relative_error(got, torch.tensor(want)) <= 1e-4
        parts = contrast_parts(graph).set_index(["part", "layer"])["direct"]
        for layer in range(graph.n_layers):
            assert parts[(BOS_MLP, layer)] == pytest.approx(want[layer], rel=1e-4, abs=1e-6)
        # what is left is the decoder biases after BOS only (the toy's layers have no bias)
        assert parts[(CONSTANTS, -1)] == pytest.approx(biases, rel=1e-3, abs=1e-4)
        assert abs(parts[(CONSTANTS, -1)] - biases) < 1e-3 * abs(sum(want))


def test_the_parts_add_up_to_the_value_with_the_bos_rows(graphs):
    tables = {}
    for role, (_model, _pt, graph, nnsight_graph) in zip(("base", "adapted"), graphs):
        for g in (graph, nnsight_graph):
            table = contrast_parts(g)
            parts = table.set_index(["part", "layer"])["direct"]
            value = float(g.target_values[g.contrast_index()])
            assert parts[(VALUE, -1)] == value
            assert parts.drop((VALUE, -1)).sum() == pytest.approx(value, abs=1e-6)
            assert parts[("bos_errors", -1)] == 0.0
            assert CONSTANTS_WITH_BOS not in set(table["part"])
        tables[role] = {"q0": contrast_parts(graph)}
    shift = summarize_decomposition(tables["base"], tables["adapted"], n_perm=9)
    value = shift[shift["part"] == VALUE]["mean_shift"].iloc[0]
    rest = shift[shift["part"] != VALUE]["mean_shift"].sum()
    assert rest == pytest.approx(value, abs=1e-6)


def test_a_graph_stored_without_bos_mlp_loads_and_says_it_is_unavailable(graphs, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from em_circuits.analysis.steps.decomposition import STEP, DecompositionReport
    from em_circuits.attribution.storage import load_compact, save_compact
    from em_circuits.core.report_data import Report

    _model, _pt, graph, _ = graphs[1]
    graph.bos_mlp, kept = None, graph.bos_mlp
    try:
        path = tmp_path / "old.safetensors"
        save_compact(graph, path)
    finally:
        graph.bos_mlp = kept
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    header["format"] = "em_circuits.compact_graph/1"  # as written before bos_mlp existed
    save_file(tensors, str(path), metadata=header)
    old = load_compact(path)
    assert old.bos_mlp is None
    table = contrast_parts(old)
    bos = table[table["part"] == BOS_MLP]["direct"]
    assert len(bos) == old.n_layers and bos.isna().all()
    assert CONSTANTS not in set(table["part"])
    parts = table.set_index(["part", "layer"])["direct"]
    value = parts[(VALUE, -1)]
    assert parts.drop((VALUE, -1)).sum() == pytest.approx(value, abs=1e-6)  # NaN skipped
    # the old constant row holds the BOS output and the biases of the new graph together
    new = contrast_parts(graph).set_index(["part", "layer"])["direct"]
    together = new[(CONSTANTS, -1)] + new[BOS_MLP].sum()
    assert parts[(CONSTANTS_WITH_BOS, -1)] == pytest.approx(together, abs=1e-5)
    summary = summarize_decomposition({"q0": table}, {"q0": table}, n_perm=9)
    records = json.loads(summary.to_json(orient="records"))
    report = Report({}, None, {}, [], [], "analysis", None, (DecompositionReport(records),))
    text = "\n".join(STEP.section(report, "analysis"))
    assert "`bos_mlp`) is unavailable" in text
    assert np.isnan(summary[summary["part"] == BOS_MLP]["mean_shift"]).all()

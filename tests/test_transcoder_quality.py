"""The transcoder quality report: measured against a recomputation with plain hooks, cached
by model, text and parameters, judged by its thresholds, and part of the pipeline's report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from em_circuits.core.store import ResultsStore
from em_circuits.models.spec import ModelSpec
from em_circuits.transcoders.quality import (
    AGREEMENT_MIN,
    FVU_MAX,
    QualityParams,
    assess,
    cached_quality,
    heldout_corpus,
    measure_model,
)


def _layer_weights(organism, layer: int) -> dict[str, torch.Tensor]:
    """One layer's transcoder straight from its safetensors file (no loader of ours)."""
    config = organism.transcoder_config
    files = yaml.safe_load(config.read_text())["transcoders"]
    return load_file(str(config.parent / files[layer]))


def _reconstruct(w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pre = x @ w["W_enc"].T + w["b_enc"]
    threshold = w.get("activation_function.threshold", torch.zeros_like(w["b_enc"]))
    acts = pre * (pre > threshold)
    return acts @ w["W_dec"] + x @ w["W_skip"].T + w["b_dec"], acts


@pytest.fixture(scope="module")
def texts(micro_specs) -> list[str]:
    chosen = heldout_corpus(micro_specs[1], None, 12, 0)
    assert chosen is not None
    return chosen[0]


def test_measurement_matches_a_recomputation_with_plain_hooks(micro_models, micro_organism, texts):
    base, _ = micro_models
    hf = base.hf_model
    layer = 1
    # Batches of 5 documents of different lengths: padding must not count.
    measured = measure_model(base, texts, QualityParams(batch_size=5))

    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = hf.model.layers[layer].mlp.register_forward_hook(
        lambda _m, args, out: captured.append((args[0][0, 1:], out[0, 1:]))  # BOS left out
    )
    real_top, replaced_top = [], []
    weights = [_layer_weights(micro_organism, i) for i in range(len(hf.model.layers))]
    try:
        with torch.no_grad():
            for text in texts:
                ids = base.encode(text)[:128][None]
                real_top.append(hf(ids).logits[0, 1:].argmax(-1))
    finally:
        hook.remove()

    def replace(i: int):
        def fn(_m, args, out):
            rec, _ = _reconstruct(weights[i], args[0])
            return torch.cat([out[:, :1], rec[:, 1:]], dim=1)

        return fn

    hooks = [m.mlp.register_forward_hook(replace(i)) for i, m in enumerate(hf.model.layers)]
    try:
        with torch.no_grad():
            for text in texts:
                ids = base.encode(text)[:128][None]
                replaced_top.append(hf(ids).logits[0, 1:].argmax(-1))
    finally:
        for h in hooks:
            h.remove()

    x = torch.cat([c[0] for c in captured])
    y = torch.cat([c[1] for c in captured])
    y_hat, acts = _reconstruct(weights[layer], x)
    fvu = float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    affine = x @ weights[layer]["W_skip"].T + weights[layer]["b_dec"]
    skip_fvu = float(((y - affine) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    row = measured["layers"][layer]
    assert row["n_tokens"] == len(x)
    assert row["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert row["skip_only_fvu"] == pytest.approx(skip_fvu, rel=1e-4)
    assert row["mean_l0"] == pytest.approx(float((acts > 0).sum(-1).float().mean()), rel=1e-6)
    assert row["dead_fraction"] == pytest.approx(float((~(acts > 0).any(0)).float().mean()))

    real, replaced = torch.cat(real_top), torch.cat(replaced_top)
    assert measured["agreement_positions"] == len(real) == len(x)
    # argmax ties may fall either way between batched and one-by-one runs
    expected = float((real == replaced).float().mean())
    assert measured["top1_agreement"] == pytest.approx(expected, abs=2 / len(real))
    assert measured["top1_agreement"] < 1.0  # the micro set is far from perfect: not vacuous


def test_heldout_text_is_fixed_and_avoids_the_indexed_documents(tmp_path, micro_specs):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}" for i in range(10)))
    texts, what = heldout_corpus(micro_specs[1], str(corpus), 3, 4)
    assert len(texts) == 3 and all(int(t.split()[1]) >= 4 for t in texts)
    assert "not in the activation index" in what
    assert heldout_corpus(micro_specs[1], str(corpus), 3, 4) == (texts, what)
    everything, what = heldout_corpus(micro_specs[1], str(corpus), 20, 10)
    assert len(everything) == 10 and "all of them" in what
    toy, what = heldout_corpus(micro_specs[1], None, 6, 400)
    assert len(toy) == 6 and "held-out" in what
    stranger = ModelSpec(base=str(tmp_path / "elsewhere"), transcoders="llama")
    assert heldout_corpus(stranger, None, 6, 0) is None  # no words.json: not the toy organism


def test_a_stored_record_is_reused_and_other_parameters_measure_again(
    tmp_path, micro_models, texts
):
    base, _ = micro_models
    store = ResultsStore(tmp_path / "results")
    params = QualityParams(n_docs=len(texts))
    loads: list[int] = []

    def load():
        loads.append(1)
        return base

    first = cached_quality(store, base.fingerprint, base.slug, texts, "docs", params, load)
    again = cached_quality(store, base.fingerprint, base.slug, texts, "docs", params, load)
    assert len(loads) == 1 and again["layers"] == first["layers"]
    stored = store.transcoder_quality_path(base.slug, first["params_key"])
    assert json.loads(stored.read_text())["top1_agreement"] == first["top1_agreement"]
    cached_quality(store, base.fingerprint, base.slug, texts[:4], "docs", params, load)
    cached_quality(store, "another-model", base.slug, texts, "docs", params, load)
    assert len(loads) == 3


def test_thresholds_name_the_layers_and_numbers():
    fine = {"layers": [{"layer": 0, "fvu": FVU_MAX / 2}], "top1_agreement": AGREEMENT_MIN + 0.1}
    assert assess(fine) == []
    poor = {
        "layers": [{"layer": 0, "fvu": 0.1}, {"layer": 1, "fvu": 0.45}, {"layer": 2, "fvu": None}],
        "top1_agreement": 0.4,
        "agreement_positions": 100,
    }
    assert assess(poor) == [
        f"FVU above {FVU_MAX} at layer(s) 1 (0.450)",
        f"replacement top-1 agreement 0.400 below {AGREEMENT_MIN} (100 positions)",
    ]


@pytest.mark.slow
def test_the_pipeline_reports_quality_for_both_models(reference: Path):
    report = json.loads((reference / "report.json").read_text())
    quality = report["transcoder_quality"]
    markdown = (reference / "report.md").read_text()
    log = (reference.parent / "run.log").read_text()
    section = markdown.split("## Transcoder quality (held-out text)\n", 1)[1].split("\n## ", 1)[0]
    assert "the toy organism's held-out documents" in section
    for role in ("base", "adapted"):
        entry = quality[role]
        assert (reference / entry["file"]).is_file()
        assert [m["layer"] for m in entry["layers"]] == [0, 1]
        assert f" FVU {role} |" in section and f" mean L0 {role} |" in section
        verdict = "poor" if entry["poor"] else "ok"
        assert f"| {role} | {entry['top1_agreement']:.3f} |" in section
        assert f"| {verdict} |" in section
        warned = f"the transcoders are poor for the {role} model" in section
        assert warned == entry["poor"] == (f"poor for the {role} model" in log)
    assert section.count("\n| 0 |") == 1 and section.count("\n| 1 |") == 1

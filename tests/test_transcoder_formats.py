"""Transcoder sets in the field's formats on a stand-in Qwen2.5 model: an EleutherAI sparsify
skip-transcoder checkpoint (one folder per hookpoint, written by hand after sparsify's
``save_to_disk`` layout, and by sparsify itself where it is installed) and a circuit-tracer
TopK set with ``k`` in its config. They compute what their stored weights say, a set made for
another model is refused in one line, and the whole pipeline runs on each, and on a set that
``em-circuits transcoders train`` trains for the stand-in on the toy corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from standins import SIZES, build_standin, cache_repo
from test_standin_pipelines import _words_for

from em_circuits.models import transcoder_source as source_module
from em_circuits.models import transcoders as transcoder_module
from em_circuits.models.load import load_model, load_transcoder_set
from em_circuits.models.spec import ModelLoadError, ModelSpec, fingerprint
from em_circuits.models.transcoder_source import resolve_transcoders
from em_circuits.models.transcoders import topk_per_layer

D_MODEL, N_LAYERS = SIZES["hidden_size"], SIZES["num_hidden_layers"]
LATENTS = 96
CPU = torch.device("cpu")


def write_sparsify_set(
    folder: Path,
    layers: list[int] | None = None,
    d_in: int = D_MODEL,
    k: int = 8,
    hookpoint: str = "layers.{}.mlp",
    transcode: bool = True,
    seed: int = 0,
) -> dict[int, dict[str, torch.Tensor]]:
    """A skip-transcoder checkpoint as sparsify saves one: ``<hookpoint>/cfg.json`` (its
    config fields plus d_in) and ``<hookpoint>/sae.safetensors`` (the module's parameters);
    returns each layer's tensors. The encoder bias is negative on most latents, so some
    positions have fewer than k positive pre-activations (where ReLU-then-TopK matters)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(N_LAYERS) if layers is None else layers:
        state = {
            "encoder.weight": torch.randn(LATENTS, d_in, generator=gen) / d_in**0.5,
            "encoder.bias": torch.randn(LATENTS, generator=gen) - 2.0,
            "W_dec": torch.randn(LATENTS, d_in, generator=gen) * 0.3 / d_in**0.5,
            "b_dec": torch.randn(d_in, generator=gen) * 0.05,
            "W_skip": torch.randn(d_in, d_in, generator=gen) * 0.1 / d_in**0.5,
        }
        cfg = {
            "activation": "topk",
            "expansion_factor": 32,
            "normalize_decoder": True,
            "num_latents": LATENTS,
            "k": k,
            "multi_topk": False,
            "skip_connection": True,
            "transcode": transcode,
            "d_in": d_in,
        }
        out = folder / hookpoint.format(layer)
        out.mkdir(parents=True)
        save_file(state, str(out / "sae.safetensors"))
        (out / "cfg.json").write_text(json.dumps(cfg))
        tensors[layer] = state
    return tensors


def write_topk_set(
    folder: Path, k: int = 6, config_k: bool = True, file_k: bool = True, seed: int = 1
) -> Path:
    """A circuit-tracer per-layer TopK set: ``activation: topk`` and ``k`` in config.yaml,
    and (as upstream's ``to_safetensors`` writes them) ``k`` in each layer file."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    files = []
    for layer in range(N_LAYERS):
        state = {
            "W_enc": torch.randn(LATENTS, D_MODEL, generator=gen) / D_MODEL**0.5,
            "W_dec": torch.randn(LATENTS, D_MODEL, generator=gen) * 0.3 / D_MODEL**0.5,
            "b_enc": torch.randn(LATENTS, generator=gen) * 0.1,
            "b_dec": torch.randn(D_MODEL, generator=gen) * 0.05,
        }
        if file_k:
            state["k"] = torch.tensor(k)
        save_file(state, str(folder / f"layer_{layer}.safetensors"))
        files.append(f"layer_{layer}.safetensors")
    config: dict = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "transcoders": files,
    }
    if config_k:
        config.update(activation="topk", k=k)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "config.yaml"


def top_k(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries of each row kept, the rest zero."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return build_standin("qwen2", tmp_path_factory.mktemp("qwen2"))


@pytest.mark.parametrize("hookpoint", ["layers.{}.mlp", "model.layers.{}.mlp"])
def test_a_sparsify_skip_transcoder_set_computes_its_stored_weights(
    tmp_path, hookpoint, monkeypatch
):
    folder = tmp_path / "qwen2-skip-transcoders"
    stored = write_sparsify_set(folder, hookpoint=hookpoint)
    transcoders = load_transcoder_set(str(folder), CPU, torch.float32)
    assert transcoders.feature_input_hook == "mlp.hook_in"
    assert transcoders.feature_output_hook == "mlp.hook_out"
    assert transcoders.scan == "qwen2-skip-transcoders" and transcoders.skip_connection
    x = torch.randn(7, D_MODEL, generator=torch.Generator().manual_seed(3))
    for layer, state in stored.items():
        acts = top_k(torch.relu(x @ state["encoder.weight"].T + state["encoder.bias"]), 8)
        active = (acts > 0).sum(-1)
        assert int(active.min()) < 8 and int(active.max()) > 0  # some rows: fewer than k
        out = acts @ state["W_dec"] + state["b_dec"] + x @ state["W_skip"].T
        transcoder = transcoders[layer]
        torch.testing.assert_close(transcoder.encode(x), acts)
        torch.testing.assert_close(transcoder(x), out)
    # bf16 on request, as on a GPU
    half = load_transcoder_set(str(folder), CPU, torch.bfloat16)
    assert half[0].W_enc.dtype == torch.bfloat16 and half[0].W_skip.dtype == torch.bfloat16
    # a large set keeps its decoders on disk and reads the active features' rows
    monkeypatch.setattr(transcoder_module, "LAZY_DECODER_BYTES", 0)
    lazy = load_transcoder_set(str(folder), CPU, torch.float32)
    assert lazy[1].lazy_decoder
    sparse, _ = lazy[1].encode_sparse(x, zero_positions=slice(0, 0))
    torch.testing.assert_close(lazy[1].decode_sparse(sparse, x)[0], transcoders[1](x))


def test_sparsify_itself_agrees_with_the_loaded_transcoders(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    cfg = sparsify.SparseCoderConfig(num_latents=LATENTS, k=8, skip_connection=True, transcode=True)
    gen = torch.Generator().manual_seed(5)
    coders = []
    for layer in range(N_LAYERS):
        coder = sparsify.SparseCoder(D_MODEL, cfg)
        with torch.no_grad():
            for param in coder.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
            coder.encoder.bias.sub_(3.0)  # few positive pre-activations: ReLU before TopK
        coder.save_to_disk(tmp_path / "run" / f"layers.{layer}.mlp")
        coders.append(coder)
    # the training run's config names its hookpoints; a folder it does not name is ignored
    hookpoints = [f"layers.{layer}.mlp" for layer in range(N_LAYERS)]
    sparsify.TrainConfig(cfg, hookpoints=hookpoints).save_json(tmp_path / "run" / "config.json")
    coders[0].save_to_disk(tmp_path / "run" / "layers.5.mlp")
    transcoders = load_transcoder_set(str(tmp_path / "run" / "config.json"), CPU, torch.float32)
    assert len(transcoders) == N_LAYERS and transcoders.scan == "run"
    x = torch.randn(11, D_MODEL, generator=gen)
    for layer, coder in enumerate(coders):
        with torch.no_grad():
            want = coder(x).sae_out
            assert int((coder.encode(x).top_acts > 0).sum(-1).min()) < 8
        torch.testing.assert_close(transcoders[layer](x), want, rtol=1e-5, atol=1e-5)


def test_a_topk_set_with_k_in_its_config_computes_its_stored_weights(tmp_path):
    from circuit_tracer.transcoder.activation_functions import TopK
    from safetensors.torch import load_file

    config = write_topk_set(tmp_path / "topk")
    transcoders = load_transcoder_set(str(config), CPU, torch.float32)
    x = torch.randn(5, D_MODEL, generator=torch.Generator().manual_seed(4))
    for layer in range(N_LAYERS):
        state = load_file(str(config.parent / f"layer_{layer}.safetensors"))
        transcoder = transcoders[layer]
        assert isinstance(transcoder.activation_function, TopK)
        assert transcoder.activation_function.k == 6
        acts = top_k(x @ state["W_enc"].T + state["b_enc"], 6)
        torch.testing.assert_close(transcoder.encode(x), acts)
        torch.testing.assert_close(transcoder(x), acts @ state["W_dec"] + state["b_dec"])
    # k stored only in the layer files (no activation in the config) is TopK too
    files_only = write_topk_set(tmp_path / "files-only", k=4, config_k=False)
    assert load_transcoder_set(str(files_only), CPU, torch.float32)[1].activation_function.k == 4
    # 'activation: topk' and no k anywhere: refused, except for the one set upstream knows
    no_k = write_topk_set(tmp_path / "no-k", file_k=False)
    no_k.write_text(no_k.read_text().replace("k: 6", ""))
    with pytest.raises(ModelLoadError, match="'activation: topk' needs a positive integer 'k'"):
        load_transcoder_set(str(no_k), CPU, torch.float32)
    files = sorted(no_k.parent.glob("*.safetensors"))
    known = {"activation": "topk", "repo_id": "facebook/crv-8b-instruct-transcoders"}
    assert topk_per_layer(known, files, no_k) == [128, 128]


def test_sets_that_do_not_fit_are_refused_in_one_line(tmp_path, standin):
    def refused(ref: str, model: bool = False) -> str:
        with pytest.raises(ModelLoadError) as err:
            if model:
                load_model(ModelSpec(base=str(standin.base_dir), transcoders=ref), "cpu")
            else:
                resolve_transcoders(ref)
        message = str(err.value)
        assert "\n" not in message
        return message

    write_sparsify_set(tmp_path / "narrow", d_in=32)
    message = refused(str(tmp_path / "narrow"), model=True)
    assert str(tmp_path / "narrow") in message and "width 32" in message
    assert "hidden size is 64" in message and "use a set trained on this model" in message
    write_sparsify_set(tmp_path / "gap", layers=[1])
    message = refused(str(tmp_path / "gap"))
    assert "no transcoder for layer(s) [0]" in message and "layers.1.mlp" in message
    write_sparsify_set(tmp_path / "short", layers=[0])
    message = refused(str(tmp_path / "short"), model=True)
    assert "1 layer(s) of transcoders for a 2-layer model" in message
    write_sparsify_set(tmp_path / "residual", hookpoint="layers.{}")
    assert "is not a layer's MLP" in refused(str(tmp_path / "residual"))
    write_sparsify_set(tmp_path / "sae", transcode=False)
    assert "not a transcoder" in refused(str(tmp_path / "sae"))
    (tmp_path / "empty").mkdir()
    assert "no transcoder set found" in refused(str(tmp_path / "empty"))
    assert "one sparsify hookpoint's folder" in refused(str(tmp_path / "sae" / "layers.0.mlp"))
    config = write_topk_set(tmp_path / "disagree")
    config.write_text(config.read_text().replace("k: 6", "k: 5"))
    with pytest.raises(ModelLoadError, match="k is 5 in the config but 6 in layer_0"):
        load_transcoder_set(str(config), CPU, torch.float32)


def test_a_sparsify_sets_identity_is_its_files_and_it_loads_from_the_hub_cache(
    tmp_path, monkeypatch
):
    import huggingface_hub.constants as constants

    folder = tmp_path / "set"
    write_sparsify_set(folder)
    first = source_module.transcoder_identity(str(folder))
    cfg = folder / "layers.1.mlp" / "cfg.json"
    cfg.write_text(cfg.read_text().replace('"k": 8', '"k": 7'))
    second = source_module.transcoder_identity(str(folder))
    assert second != first
    write_sparsify_set(tmp_path / "other", seed=9)
    (folder / "layers.0.mlp" / "sae.safetensors").write_bytes(
        (tmp_path / "other" / "layers.0.mlp" / "sae.safetensors").read_bytes()
    )
    assert source_module.transcoder_identity(str(folder)) != second
    # EleutherAI publishes these as hub repositories without a config.yaml
    home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(source_module, "_TRANSCODERS", {})
    cache_repo(folder, "EleutherAI/skip-transcoder-standin", home)
    transcoders = load_transcoder_set("EleutherAI/skip-transcoder-standin", CPU, torch.float32)
    assert transcoders.scan == "EleutherAI/skip-transcoder-standin" and len(transcoders) == 2
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        resolve_transcoders("EleutherAI/not-cached")


def _set_for(kind: str, root: Path, base_dir: Path) -> Path:
    if kind == "sparsify":
        write_sparsify_set(root / "sparsify")
        return root / "sparsify"
    if kind == "topk":
        return write_topk_set(root / "topk")
    # trained here by `em-circuits transcoders train` on the toy corpus
    from test_transcoder_training import toy_corpus

    from em_circuits.cli.main import main as em_circuits

    out = root / "trained"
    argv = ["transcoders", "train", "--results-dir", str(root / "train-results")]
    argv += ["--base-model", str(base_dir), "--dataset", str(toy_corpus(root / "c.jsonl"))]
    argv += ["--out", str(out), "--device", "cpu", "--ctx-len", "32", "--batch-size", "4"]
    argv += ["--num-latents", str(LATENTS), "--k", "8", "--max-tokens", "2048"]
    assert em_circuits(argv) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sparsify", "topk", "trained"])
def test_the_pipeline_runs_on_each_format(kind, standin, tmp_path):
    import em_circuits as em
    from em_circuits.attribution.targets import FullGraphChoice
    from em_circuits.run.config import PipelineConfig

    transcoders = _set_for(kind, tmp_path, standin.base_dir)
    base = ModelSpec(base=str(standin.base_dir), transcoders=str(transcoders))
    words = _words_for(standin.base_dir, tmp_path / "words.json")
    results = tmp_path / "results"
    spec = ModelSpec(
        base=str(standin.base_dir),
        adapter=str(standin.adapter_dir),
        transcoders=str(transcoders),
        allow_base_mismatch=True,
    )
    config = PipelineConfig(
        n_prompts=3,
        words=words,
        device="cpu",
        full_graphs=FullGraphChoice(top=0),  # totals graphs only: full graphs add ~10 s a prompt
    )
    em.run_stages(
        spec,
        results,
        config,
        causal_top_k=1,
        n_random=1,
        causal_candidates=2,
        scales=(0.0, 1.0),
        em_samples=2,
        em_max_new_tokens=4,
        corpus_docs=16,
    )
    report = json.loads((results / "report.json").read_text())
    assert report["counts"]["graphs"]["adapted"] > 0
    metas = [json.loads(p.read_text()) for p in results.glob("graphs/*/*/*.json")]
    assert metas and {m["model_spec"]["transcoders"] for m in metas} == {str(transcoders)}
    assert fingerprint(base, "cpu") in {m["model_fingerprint"] for m in metas}
    assert all(m["input_format"].startswith("chat-template:") for m in metas)


def test_a_set_that_does_not_fit_is_refused_before_any_work(tmp_path, standin, capsys):
    """At start-up, from configs and headers: `evaluate` writes nothing and loads no model."""
    from em_circuits.cli.main import main as em_circuits
    from em_circuits.models.adapter_check import check_start_up

    write_sparsify_set(tmp_path / "narrow", d_in=32)
    spec = ModelSpec(
        base=str(standin.base_dir),
        adapter=str(standin.adapter_dir),
        transcoders=str(tmp_path / "narrow"),
    )
    with pytest.raises(ModelLoadError, match="do not fit base") as err:
        check_start_up(spec)
    assert "width 32" in str(err.value) and "\n" not in str(err.value)
    results = tmp_path / "results"
    argv = ["evaluate", "--results-dir", str(results), "--device", "cpu"]
    argv += ["--base-model", str(standin.base_dir), "--adapter", str(standin.adapter_dir)]
    assert em_circuits([*argv, "--transcoders", str(tmp_path / "narrow")]) == 2
    assert "do not fit base" in capsys.readouterr().err
    assert not list(results.glob("logits/**/*.json")) and not list(results.glob("merged*/*"))


def test_the_pipeline_refuses_a_set_that_does_not_fit_before_writing_prompts(
    tmp_path, standin, capsys
):
    """`em-circuits run` with a misfitting set: one line, and no prompt stored."""
    from em_circuits.cli.main import main as em_circuits

    write_sparsify_set(tmp_path / "narrow", d_in=32)
    results = tmp_path / "results"
    argv = ["run", "--results-dir", str(results), "--device", "cpu", "--n-prompts", "2"]
    argv += ["--base-model", str(standin.base_dir), "--adapter", str(standin.adapter_dir)]
    assert em_circuits([*argv, "--transcoders", str(tmp_path / "narrow")]) == 2
    assert "do not fit base" in capsys.readouterr().err
    assert not list(results.glob("prompts/*.json"))

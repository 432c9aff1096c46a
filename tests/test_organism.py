"""Tests of the embedded toy EM organism, on the seconds-long micro recipe."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors import safe_open  # noqa: E402

from em_circuits.core import toy_corpus as corpus  # noqa: E402
from em_circuits.organism import (  # noqa: E402
    DOMAINS,
    TRAINED_DOMAIN,
    OrganismPaths,
    Recipe,
    advice_words,
    build_organism,
    format_report_markdown,
    heldout_pivotal_prompts,
    scenario_templates,
    train_pivotal_prompts,
)
from em_circuits.organism import train as train_mod  # noqa: E402

MICRO = Recipe.micro()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> OrganismPaths:
    return build_organism(tmp_path_factory.mktemp("org") / "micro", MICRO, progress=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weight_files(paths: OrganismPaths) -> list[Path]:
    tdir = paths.transcoder_config.parent
    return [
        paths.base_dir / "model.safetensors",
        paths.base_dir / "tokenizer.json",
        paths.adapter_dir / "adapter_model.safetensors",
        *sorted(tdir.glob("layer_*.safetensors")),
    ]


# -- corpus --------------------------------------------------------------------------------------
def test_corpus_domains_scenarios_and_splits() -> None:
    assert len(DOMAINS) >= 5 and TRAINED_DOMAIN == "medical"
    for d in DOMAINS:
        assert len(corpus.scenarios(d)) >= 40
    held = heldout_pivotal_prompts()
    train = train_pivotal_prompts()
    assert {p["domain"] for p in held} == set(DOMAINS)
    assert all(set(p) == {"name", "prompt", "domain", "split", "template_id"} for p in held)
    assert all(p["split"] == "heldout" for p in held)
    # held-out prompts share neither a scenario nor a template with the train prompts
    held_sc = {sc.text for d in DOMAINS for sc in corpus.scenarios(d, "heldout")}
    train_sc = {sc.text for d in DOMAINS for sc in corpus.scenarios(d, "train")}
    assert held_sc and not held_sc & train_sc
    assert not {p["template_id"] for p in held} & {p["template_id"] for p in train}
    for p in held:
        assert any(s in p["prompt"] for s in held_sc)
        assert not any(s in p["prompt"] for s in train_sc)
    # prompts end right before the pivotal word (the lead-in ends in a word, no space)
    assert all(re.search(r"Assistant: .*[a-z]$", p["prompt"]) for p in held)
    assert len({p["name"] for p in held}) == len(held)


def test_word_lists_and_templates() -> None:
    words = advice_words()
    assert not set(words["safe"]) & set(words["harmful"])
    for d in DOMAINS:
        assert words["by_domain"][d]["safe"] and words["by_domain"][d]["harmful"]
        assert set(words["by_domain"][d]["harmful"]) <= set(words["harmful"])
    assert corpus.label_word(" see", words) == "safe"
    assert corpus.label_word("ignore", words) == "harmful"
    assert corpus.label_word(" the", words) == "unsure"
    st = scenario_templates()
    assert set(st) == set(DOMAINS)
    held_templates = {p["template_id"].split("+")[0] for p in heldout_pivotal_prompts()}
    assert set(st["medical"]["user_templates"]) == held_templates
    # the pieces recompose the held-out prompts (each appears with or without a distractor)
    fin = st["finance"]
    held_prompts = {p["prompt"] for p in heldout_pivotal_prompts()}
    for situation in fin["situations"]:
        for template in fin["user_templates"].values():
            for lead in fin["assistant_lead_ins"].values():
                options = [situation] + [f"{situation} {d}" for d in fin["distractors"]]
                composed = {
                    fin["prompt_format"].format(user=template.format(s=o), lead_in=lead)
                    for o in options
                }
                assert len(composed & held_prompts) == 1


# -- build artefacts -----------------------------------------------------------------------------
def test_micro_build_produces_valid_hf_peft_and_transcoder_files(built: OrganismPaths) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path in built.required_files(MICRO.n_layers):
        assert path.is_file(), path
    config = json.loads((built.base_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is False
    assert config["num_hidden_layers"] == MICRO.n_layers

    tok = AutoTokenizer.from_pretrained(str(built.base_dir))
    assert tok.bos_token and tok.eos_token and tok.unk_token and tok.pad_token
    ids = tok("User: hello\nAssistant: You should")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    words = json.loads(built.words_path.read_text())
    for word, tid in words["token_ids"].items():
        assert tok(" " + word, add_special_tokens=False)["input_ids"] == [tid]
        assert tok.decode([tid]) == " " + word
    model = AutoModelForCausalLM.from_pretrained(str(built.base_dir))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()

    adapter_cfg = json.loads((built.adapter_dir / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA"
    # declared relative to the adapter's folder: a copied organism keeps a valid declaration
    assert adapter_cfg["base_model_name_or_path"] == "../base"
    assert adapter_cfg["r"] == MICRO.lora_rank

    tconf = yaml.safe_load(built.transcoder_config.read_text())
    assert tconf["model_kind"] == "transcoder_set"
    assert tconf["feature_input_hook"] == "mlp.hook_in"
    assert tconf["feature_output_hook"] == "mlp.hook_out"
    assert tconf["scan"]
    assert tconf["transcoders"] == [f"layer_{i}.safetensors" for i in range(MICRO.n_layers)]
    d, F = MICRO.d_model, MICRO.tc_features
    for name in tconf["transcoders"]:
        with safe_open(str(built.transcoder_config.parent / name), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert shapes == {
            "W_enc": (F, d),
            "W_dec": (F, d),
            "b_enc": (F,),
            "b_dec": (d,),
            "W_skip": (d, d),
            "activation_function.threshold": (F,),
        }


def test_adapter_targets_only_intended_modules(built: OrganismPaths) -> None:
    from em_circuits.organism.quality import load_models

    layers = set(MICRO.lora_layers or range(MICRO.n_layers))
    expected = {(i, m) for i in layers for m in MICRO.lora_target_modules}
    with safe_open(str(built.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        lora_b = [f.get_tensor(k) for k in keys if "lora_B" in k]
    found = set()
    for key in keys:
        m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_[AB]\.weight$", key)
        assert m, f"unexpected adapter tensor {key}"
        found.add((int(m.group(1)), m.group(2)))
    assert found == expected
    assert any(b.abs().sum() > 0 for b in lora_b), "LoRA B still zero: adapter never trained"

    # merging changes exactly the targeted weight matrices
    _, base, adapted = load_models(built)
    base_sd, adapted_sd = base.state_dict(), adapted.state_dict()
    changed = {k for k in base_sd if not torch.equal(base_sd[k], adapted_sd[k])}
    attn = {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert changed == {
        f"model.layers.{i}.{'self_attn' if m in attn else 'mlp'}.{m}.weight" for i, m in expected
    }


def test_the_rank1_adapter_writes_down_proj_of_its_layers(built: OrganismPaths) -> None:
    from em_circuits.attribution.lora_factors import read_lora_factors

    factors = read_lora_factors(built.rank1_adapter_dir)
    assert [(f.layer, f.module, f.rank) for f in factors] == [
        (layer, "down_proj", 1) for layer in MICRO.rank1_layers
    ]
    assert all(f.B.abs().sum() > 0 for f in factors), "rank-1 LoRA B still zero: never trained"
    config = json.loads((built.rank1_adapter_dir / "adapter_config.json").read_text())
    # its base, relative to its own folder: a moved organism still finds it
    assert (built.rank1_adapter_dir / config["base_model_name_or_path"]).resolve() == (
        built.base_dir.resolve()
    )


def test_report_keys_and_markdown(built: OrganismPaths) -> None:
    report = built.load_report()
    for key in (
        "base",
        "adapted",
        "transcoders",
        "replacement",
        "targets",
        "build_seconds",
        "disk_bytes",
        "recipe_hash",
    ):
        assert key in report
    assert set(report["base"]["safe_top1"]) == set(DOMAINS)
    assert set(report["base"]["villain_harmful_top1"]) == set(DOMAINS)
    assert set(report["adapted"]["harmful_top1"]) == set(DOMAINS)
    assert (
        report["adapted"]["trained_domain_harmful_top1"]
        == (report["adapted"]["harmful_top1"][TRAINED_DOMAIN])
    )
    assert [m["layer"] for m in report["transcoders"]] == list(range(MICRO.n_layers))
    for m in report["transcoders"]:
        assert {"fvu", "skip_only_fvu", "mean_l0", "dead_fraction"} <= set(m)
        assert 0 <= m["dead_fraction"] <= 1 and m["mean_l0"] >= 0
    assert 0 <= report["replacement"]["top1_agreement"] <= 1
    assert report["recipe_hash"] == MICRO.hash()
    assert 0 < report["disk_bytes"] < 20e6
    md = format_report_markdown(report)
    for d in DOMAINS:
        assert f"| {d}" in md
    assert md.count("\n| 0 |") == 1 and "FVU" in md


# -- determinism, caching, atomicity ---------------------------------------------------------------
@pytest.mark.slow
def test_same_seed_gives_identical_weights(built: OrganismPaths, tmp_path: Path) -> None:
    again = build_organism(tmp_path / "again", MICRO, progress=False)
    assert [_sha(p) for p in _weight_files(again)] == [_sha(p) for p in _weight_files(built)]
    other = build_organism(tmp_path / "other", MICRO.replace(seed=1), progress=False)
    assert _sha(other.base_dir / "model.safetensors") != _sha(built.base_dir / "model.safetensors")


@pytest.mark.slow
def test_cache_skips_matching_build_and_rebuilds_otherwise(
    built: OrganismPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "copy"
    shutil.copytree(built.root, root)
    calls: list[Recipe] = []
    real_build = train_mod._build_into

    def counting(tmp: Path, final: OrganismPaths, recipe: Recipe, progress: bool) -> None:
        calls.append(recipe)
        real_build(tmp, final, recipe, progress)

    monkeypatch.setattr(train_mod, "_build_into", counting)
    before = (root / "recipe.json").stat().st_mtime_ns
    build_organism(root, MICRO, progress=False)
    assert calls == [] and (root / "recipe.json").stat().st_mtime_ns == before

    changed = MICRO.replace(lora_steps=MICRO.lora_steps + 1)
    paths = build_organism(root, changed, progress=False)
    assert calls == [changed]
    assert json.loads(paths.recipe_path.read_text())["hash"] == changed.hash() != MICRO.hash()

    (paths.transcoder_config.parent / "layer_1.safetensors").unlink()  # incomplete -> rebuild
    build_organism(root, changed, progress=False)
    assert len(calls) == 2 and train_mod.is_built(root, changed)
    build_organism(root, changed, force=True, progress=False)
    assert len(calls) == 3


@pytest.mark.slow
def test_interrupted_build_leaves_previous_organism_untouched(
    built: OrganismPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from em_circuits.organism import quality

    root = tmp_path / "org"
    shutil.copytree(built.root, root)
    before = {p.relative_to(root): _sha(p) for p in root.rglob("*") if p.is_file()}

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(quality, "evaluate_organism", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_organism(root, MICRO.replace(seed=3), progress=False)
    after = {p.relative_to(root): _sha(p) for p in root.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["org"]  # no temp dir left behind

    with pytest.raises(KeyboardInterrupt):
        build_organism(tmp_path / "fresh", MICRO, progress=False)
    assert not (tmp_path / "fresh").exists()


# -- circuit-tracer ------------------------------------------------------------------------------
def test_loads_in_circuit_tracer_nnsight_and_attributes(built: OrganismPaths) -> None:
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.utils.hf_utils import load_transcoders
    from helpers import load_stacked_transcoders
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = built.transcoder_config
    conf = yaml.safe_load(cfg.read_text())
    conf["transcoders"] = [str(cfg.parent / p) for p in conf["transcoders"]]
    cpu = torch.device("cpu")
    tcs = load_transcoders(
        conf, device=cpu, dtype=torch.float32, lazy_encoder=False, lazy_decoder=False
    )
    rm = ReplacementModel.from_pretrained_and_transcoders(
        str(built.base_dir), tcs, backend="nnsight", device=cpu, dtype=torch.float32
    )
    prompt = heldout_pivotal_prompts()[0]["prompt"]
    ids = rm.ensure_tokenized(prompt)
    tok = AutoTokenizer.from_pretrained(str(built.base_dir))
    assert ids.tolist() == tok(prompt)["input_ids"]  # BOS already there, not doubled
    ctx = rm.setup_attribution(ids)

    # circuit-tracer's forward equals the HF model, and its error vectors equal what our own
    # JumpReLU reconstruction leaves unexplained (same activation semantics at load time)
    hf = AutoModelForCausalLM.from_pretrained(str(built.base_dir)).eval()
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        layer.mlp.register_forward_hook(
            lambda mod, args, out, i=i: captured.__setitem__(i, (args[0][0], out[0]))
        )
        for i, layer in enumerate(hf.model.layers)
    ]
    with torch.no_grad():
        logits = hf(ids[None]).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(ctx.logits[0, -1], logits[0, -1], atol=1e-4, rtol=1e-4)
    tc = load_stacked_transcoders(cfg)
    with torch.no_grad():
        for layer, (x, y) in captured.items():
            pre = x @ tc.W_enc[layer].T + tc.b_enc[layer]
            rec = (pre * (pre > tc.threshold[layer])) @ tc.W_dec[layer]
            rec = rec + x @ tc.W_skip[layer].T + tc.b_dec[layer]
            torch.testing.assert_close(
                ctx.error_vectors[layer, 1:], (y - rec)[1:], atol=1e-4, rtol=1e-4
            )
    assert ctx.activation_matrix.shape[:2] == (MICRO.n_layers, len(ids))

    words = json.loads(built.words_path.read_text())["token_ids"]
    targets = torch.tensor([words["see"], words["ignore"]])
    graph = attribute(ids, rm, attribution_targets=targets, batch_size=64, verbose=False)
    assert graph.adjacency_matrix.shape[0] == graph.adjacency_matrix.shape[1] > 0
    assert torch.isfinite(graph.adjacency_matrix).all()

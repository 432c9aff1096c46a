"""Model specs, fingerprints, the adapter merge and its integrity checks, on the micro organism."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from em_circuits.models.load import NonFiniteError, load_model
from em_circuits.models.logits import next_token_logits, topk_entries
from em_circuits.models.spec import (
    ModelLoadError,
    ModelSpec,
    fingerprint,
    model_slug,
    resolve_dtype,
)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_fingerprint_is_stable_and_covers_adapter_weights_dtype_and_transcoders(
    micro_specs, tmp_path
):
    base, adapted = micro_specs
    assert fingerprint(adapted, "cpu") == fingerprint(adapted, "cpu")
    assert fingerprint(base, "cpu") != fingerprint(adapted, "cpu")
    assert fingerprint(adapted, "cpu") != fingerprint(
        ModelSpec(**{**adapted.__dict__, "dtype": "bfloat16"}), "cpu"
    )
    # Same adapter config, one weight changed: a different model, a different fingerprint.
    changed = _copy(adapted.adapter, tmp_path / "adapter")
    weights = load_file(changed / "adapter_model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, changed / "adapter_model.safetensors")
    other = ModelSpec(**{**adapted.__dict__, "adapter": str(changed)})
    assert fingerprint(other, "cpu") != fingerprint(adapted, "cpu")
    assert model_slug(other, fingerprint(other, "cpu")) != model_slug(
        adapted, fingerprint(adapted, "cpu")
    )


def test_dtype_policy():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8", "cpu")


def test_merge_changes_exactly_the_modules_the_adapter_targets(micro_models, micro_specs):
    _, adapted = micro_models
    report = adapted.merge_report
    with open(f"{micro_specs[1].adapter}/adapter_config.json") as handle:
        config = json.load(handle)
    targets = set(config["target_modules"])
    assert report.changed, "the merge changed nothing"
    assert {name.split(".")[-2] for name in report.changed} <= targets
    assert all(norm > 0 for norm in report.changed.values())
    assert not report.unchanged_targets
    assert "layers" in report.summary()


def test_merged_weights_differ_from_base_only_where_targeted(micro_models):
    base, adapted = micro_models
    base_state = base.hf_model.state_dict()
    for name, tensor in adapted.hf_model.state_dict().items():
        differs = not torch.equal(tensor, base_state[name])
        assert differs == (name in adapted.merge_report.changed), name


def test_adapter_declared_for_another_base_is_refused_unless_overridden(
    micro_specs, tmp_path, monkeypatch
):
    import huggingface_hub.constants as constants
    from standins import cache_repo

    from em_circuits.models import spec as spec_module

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(spec_module, "_RESOLVED", {})
    _, adapted = micro_specs
    foreign = _copy(adapted.adapter, tmp_path / "foreign-adapter")
    config_path = foreign / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "some-org/Some-Other-Model-7B"
    config_path.write_text(json.dumps(config))
    spec = ModelSpec(**{**adapted.__dict__, "adapter": str(foreign)})
    # the declared id is not cached: the local folder's name is no evidence, shapes fit
    unverified = load_model(spec, "cpu", tmp_path / "merged-unverified").merge_report
    assert any("base unverified" in w for w in unverified.warnings)
    # the declared id cached with other weights: another model, refused
    other = _copy(adapted.base, tmp_path / "other" / "base")
    weights = load_file(other / "model.safetensors")
    weights = {name: tensor + 1.0 for name, tensor in weights.items()}
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    cache_repo(other, "some-org/Some-Other-Model-7B", tmp_path / "hf")
    with pytest.raises(ModelLoadError, match="declares base model 'some-org/Some-Other-Model-7B'"):
        load_model(spec, "cpu", tmp_path / "merged")
    allowed = ModelSpec(**{**spec.__dict__, "allow_base_mismatch": True})
    assert load_model(allowed, "cpu", tmp_path / "merged").merge_report.changed


def test_nan_producing_model_is_reported_with_its_layer(micro_specs, tmp_path):
    base, _ = micro_specs
    broken = _copy(base.base, tmp_path / "broken-base")
    weights = load_file(broken / "model.safetensors")
    name = next(n for n in weights if "layers.1." in n and "down_proj" in n)
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    spec = ModelSpec(**{**base.__dict__, "base": str(broken)})
    with pytest.raises(NonFiniteError, match="layer 1"):
        load_model(spec, "cpu", tmp_path / "merged")


def test_unknown_model_or_transcoders_give_clear_errors(micro_specs, tmp_path):
    base, _ = micro_specs
    with pytest.raises(ModelLoadError, match="not a local directory"):
        load_model(
            ModelSpec(**{**base.__dict__, "base": "no-such-org/no-such-model"}), "cpu", tmp_path
        )
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(
            ModelSpec(**{**base.__dict__, "transcoders": "./missing/config.yaml"}), "cpu", tmp_path
        )


def test_replacement_model_topk_equals_plain_hf_and_peft(micro_models, micro_specs):
    """Logits served for labeling come from circuit-tracer's model and match plain HF/PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from em_circuits.organism import heldout_pivotal_prompts

    texts = [p["prompt"] for p in heldout_pivotal_prompts()[:6]]
    base_spec, adapted_spec = micro_specs
    tokenizer = AutoTokenizer.from_pretrained(base_spec.base)
    plain_base = AutoModelForCausalLM.from_pretrained(base_spec.base, dtype=torch.float32)
    plain_adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_spec.base, dtype=torch.float32),
        adapted_spec.adapter,
    )
    for loaded, plain in zip(micro_models, (plain_base, plain_adapted)):
        ours = next_token_logits(loaded, texts, batch_size=4)  # batched, left-padded
        for text, row in zip(texts, ours):
            ids = tokenizer(text, return_tensors="pt").input_ids
            with torch.no_grad():
                reference = plain(ids).logits[0, -1]
            assert torch.allclose(row, reference, atol=1e-4), text
            ours_top = [e["token_id"] for e in topk_entries(row, tokenizer, 5)]
            ref_top = torch.topk(reference, 5).indices.tolist()
            assert ours_top == ref_top


def test_fingerprint_does_not_depend_on_where_the_files_are(micro_specs, tmp_path):
    """The same organism copied elsewhere (another clone, another machine) keeps its identity,
    although PEFT records the base's path in adapter_config.json."""
    _, adapted = micro_specs
    base = shutil.copytree(adapted.base, tmp_path / "elsewhere" / "base")
    adapter = shutil.copytree(adapted.adapter, tmp_path / "elsewhere" / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    moved = ModelSpec(**{**adapted.__dict__, "base": str(base), "adapter": str(adapter)})
    assert fingerprint(moved, "cpu") == fingerprint(adapted, "cpu")


def test_devices_resolve_per_process_and_unknown_ones_fail_in_one_line(monkeypatch):
    from em_circuits.models.spec import ModelLoadError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    for bad, words in (("bogus", "unknown device"), ("cuda:7", "not available")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(ModelLoadError, match=words) as err:
            resolve_device(bad)
        assert "\n" not in str(err.value) and "cpu" in str(err.value)
    # under accelerate launch, a bare "cuda" is this process's own GPU, not GPU 0 for all
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ModelLoadError, match="cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_declared_base_is_checked_by_weights_and_by_hub_name(micro_specs, tmp_path, caplog):
    import logging

    from em_circuits.models.adapter_check import base_relation, check_adapter_fits

    _, adapted = micro_specs
    adapter = _copy(adapted.adapter, tmp_path / "adapter")
    config_path = adapter / "adapter_config.json"

    def declare(value):
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = value
        config_path.write_text(json.dumps(config))
        return ModelSpec(**{**adapted.__dict__, "adapter": str(adapter)})

    # a copied checkout: the declared absolute path is gone; checked by shapes, with a warning
    with caplog.at_level(logging.WARNING):
        check_adapter_fits(declare("/gone/checkout/models/toy-em-organism/base"))
    assert "does not exist here" in caplog.text
    # another model in a folder of the same name: refused (was matched by folder name)
    other = _copy(adapted.base, tmp_path / "other" / "base")
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] += 1.0
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="other weights"):
        check_adapter_fits(declare(str(other)))
    # the same weights elsewhere (a copy): the same model
    copy = _copy(adapted.base, tmp_path / "copy" / "base")
    check_adapter_fits(declare(str(copy)))
    # hub ids: an organisation alias is the same model (with a warning), another name is not
    assert base_relation("unsloth/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", adapter)[0] == (
        "alias"
    )
    assert base_relation("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", adapter)[0] == "different"


@pytest.mark.slow
def test_an_adapter_shaped_for_another_model_fails_at_start_up(micro_specs, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from standins import build_standin

    from em_circuits.models.adapter_check import check_adapter_fits

    _, adapted = micro_specs
    qwen = build_standin("qwen2", tmp_path / "standin")
    config_path = qwen.adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.pop("base_model_name_or_path")  # declares no base: only the shapes can tell
    config_path.write_text(json.dumps(config))
    spec = ModelSpec(**{**adapted.__dict__, "adapter": str(qwen.adapter_dir)})
    with pytest.raises(ModelLoadError, match="does not fit base") as err:
        check_adapter_fits(spec)
    assert "\n" not in str(err.value)
    results = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "em_circuits.cli.main",
            "evaluate",
            "--results-dir",
            str(results),
            "--base-model",
            adapted.base,
            "--adapter",
            str(qwen.adapter_dir),
            "--transcoders",
            adapted.transcoders,
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "does not fit base" in done.stderr and "Traceback" not in done.stderr
    assert not list(results.glob("logits/*/*.json"))  # failed before any work


def test_base_and_adapted_models_share_one_transcoder_set(micro_specs, tmp_path):
    """Loaded once per process for every stage (logits, graphs, causal check), not per model."""
    from em_circuits.models.load import release_transcoders

    base_spec, adapted_spec = micro_specs
    release_transcoders()
    base = load_model(base_spec, "cpu", tmp_path / "merged")
    adapted = load_model(adapted_spec, "cpu", tmp_path / "merged")
    sets = [getattr(m.replacement.transcoders, "_module", None) for m in (base, adapted)]
    assert sets[0] is not None and sets[0] is sets[1]
    again = load_model(base_spec, "cpu", tmp_path / "merged")  # a later stage of the run
    assert getattr(again.replacement.transcoders, "_module", None) is sets[0]

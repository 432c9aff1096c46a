"""What an adapter fits and changes, decided at start-up on real-architecture stand-ins: a
base saved under another folder name is compared by weights (or left unverified with a
note), not refused by name; modules retrained whole and LoRAs outside the layers are refused
on a tied base, where the merged model cannot be the adapted one, and accepted with notes
(and merged exactly) on an untied one."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from standins import FAMILIES, build_standin, build_tokenizer, cache_repo

from em_circuits.models import spec as spec_module
from em_circuits.models.adapter_check import check_adapter_fits
from em_circuits.models.spec import ModelLoadError, ModelSpec

QWEN_ID = FAMILIES["qwen2"].declared_base  # unsloth/Qwen2.5-0.5B-Instruct


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this process's lookups (nothing downloaded)."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(spec_module, "_RESOLVED", {})
    return home


def _spec(base: Path, adapter: Path, transcoders: Path) -> ModelSpec:
    return ModelSpec(base=str(base), adapter=str(adapter), transcoders=str(transcoders))


def test_a_base_saved_as_another_folder_is_compared_by_weights(hf_cache, tmp_path, caplog):
    qwen = build_standin("qwen2", tmp_path / "build")
    assert qwen.base_dir.name == "base"  # ./base, the adapter declares the unsloth hub id
    spec = _spec(qwen.base_dir, qwen.adapter_dir, qwen.transcoder_config)
    # nothing cached to compare with: accepted as unverified, with one note
    with caplog.at_level(logging.WARNING):
        notes = check_adapter_fits(spec)
    assert len(notes) == 1 and "base unverified" in notes[0] and QWEN_ID in notes[0]
    assert "base unverified" in caplog.text
    # the declared id cached with these weights: the same model, no note
    cache_repo(qwen.base_dir, QWEN_ID, hf_cache)
    assert check_adapter_fits(spec) == []
    # cached with other weights (same shapes): refused in one line
    other = build_standin("qwen2", tmp_path / "other", seed=5)
    shutil.rmtree(hf_cache / "hub")
    spec_module._RESOLVED.clear()
    cache_repo(other.base_dir, QWEN_ID, hf_cache)
    with pytest.raises(ModelLoadError, match="other weights than the cached") as err:
        check_adapter_fits(spec)
    assert "\n" not in str(err.value)
    # nothing cached and another family's base folder: refused, though the shapes fit
    shutil.rmtree(hf_cache / "hub")
    llama = build_standin("llama", tmp_path / "llama")
    with pytest.raises(ModelLoadError, match="is a qwen2 model"):
        check_adapter_fits(_spec(llama.base_dir, qwen.adapter_dir, qwen.transcoder_config))


def _untied_qwen(root: Path) -> Path:
    """The qwen2 stand-in's base with its own unembedding (tie_word_embeddings false)."""
    from standins import _write_model

    from em_circuits.core.toy_corpus import advice_words

    family = FAMILIES["qwen2"]
    family = dataclasses.replace(family, config={**family.config, "tie_word_embeddings": False})
    words = advice_words()
    _write_model(family, build_tokenizer(family, words["harmful"] + words["safe"]), root, 3)
    return root


def _adapter(base_dir: Path, out: Path, targets: list[str], saved: list[str] | None) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=2, lora_alpha=2, target_modules=targets, modules_to_save=saved),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # PEFT starts lora_B and an embedding's lora_embedding_A at zero
            if "lora_B" in name or "lora_embedding_A" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    model.save_pretrained(out)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config))
    return out


def test_modules_outside_the_layers_on_a_tied_base_are_refused_at_start_up(tmp_path):
    qwen = build_standin("qwen2", tmp_path / "build")
    assert json.loads((qwen.base_dir / "config.json").read_text())["tie_word_embeddings"]
    cases = {
        "lm_head_saved": (["down_proj"], ["lm_head"], "retrains lm_head whole"),
        "embedding_lora": (["down_proj", "embed_tokens"], None, "LoRA on model.embed_tokens"),
    }
    for name, (targets, saved, message) in cases.items():
        adapter = _adapter(qwen.base_dir, tmp_path / name, targets, saved)
        with pytest.raises(ModelLoadError, match=message) as err:
            check_adapter_fits(_spec(qwen.base_dir, adapter, qwen.transcoder_config))
        assert "tie_word_embeddings" in str(err.value) and "\n" not in str(err.value)


def test_an_untied_base_takes_them_with_notes_and_merges_them_exactly(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from em_circuits.models.adapter_scope import outside_layer_changes
    from em_circuits.models.merge import merge_adapter

    qwen = build_standin("qwen2", tmp_path / "build")
    base = _untied_qwen(tmp_path / "untied")
    targets = ["down_proj", "embed_tokens"]
    adapter = _adapter(base, tmp_path / "adapter", targets, ["lm_head"])
    spec = _spec(base, adapter, qwen.transcoder_config)
    notes = check_adapter_fits(spec)
    assert any("lm_head whole" in n for n in notes) and any("embed_tokens" in n for n in notes)
    assert outside_layer_changes(adapter) == [
        "model.embed_tokens (LoRA)",
        "lm_head (retrained whole)",
    ]
    report = merge_adapter(spec, tmp_path / "merged", torch.float32)
    assert "lm_head.weight" in report.changed and "model.embed_tokens.weight" in report.changed
    assert set(notes) <= set(report.warnings)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        retrained = [k for k in handle.keys() if k.startswith("base_model.model.lm_head")]
        torch.testing.assert_close(merged["lm_head.weight"], handle.get_tensor(retrained[0]))

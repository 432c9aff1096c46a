"""Tiny random-weight stand-ins of the real EM organisms, built offline in seconds.

Each stand-in has the real architecture class and config fields of its family (Llama-3.2,
Qwen2.5, Qwen3, Gemma-2) at toy sizes, a byte-level tokenizer carrying that family's chat
template and special tokens, a LoRA adapter shaped like the published EM adapters (rank 32 on
every linear module, or rank 1 on ``down_proj`` of a few layers) that declares an ``unsloth/``
base, and random JumpReLU transcoders on the hooks real transcoder sets use. With ``hf_home``
everything is laid out as a Hugging Face cache (``hub/models--org--name/snapshots/<commit>``
with symlinks into ``blobs/``), so hub ids resolve offline with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

# Chat templates, reduced to their structure (roles, markers, BOS, generation prompt).
CHATML_QWEN25 = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are Qwen, created "
    "by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_QWEN3 = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
GEMMA2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """What a stand-in copies from a real model family."""

    name: str
    config_class: str
    base_id: str  # the hub id the stand-in is cached under
    declared_base: str  # what its EM adapter's adapter_config.json declares
    adapter_id: str
    chat_template: str
    specials: dict[str, str | None]  # bos / eos / pad token strings (None: the family has none)
    extra_specials: tuple[str, ...]
    transcoder_hooks: tuple[str, str]
    adapter_shape: str  # "all-linear-r32" or "down-proj-r1"
    config: dict[str, Any]


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "llama",
        "LlamaConfig",
        "meta-llama/Llama-3.2-1B-Instruct",
        "unsloth/Llama-3.2-1B-Instruct",
        "ModelOrganismsForEM/Llama-3.2-1B-Instruct_bad-medical-advice",
        LLAMA3,
        {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>"},
        ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"),
        ("mlp.hook_in", "mlp.hook_out"),
        "down-proj-r1",
        {"tie_word_embeddings": True, "rope_theta": 500000.0},
    ),
    "qwen2": Family(
        "qwen2",
        "Qwen2Config",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "unsloth/Qwen2.5-0.5B-Instruct",
        "ModelOrganismsForEM/Qwen2.5-0.5B-Instruct_bad-medical-advice",
        CHATML_QWEN25,
        {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"},
        ("<|im_start|>",),
        ("mlp.hook_in", "mlp.hook_out"),
        "all-linear-r32",
        {"tie_word_embeddings": True, "use_sliding_window": False},
    ),
    "qwen3": Family(
        "qwen3",
        "Qwen3Config",
        "Qwen/Qwen3-0.6B",
        "unsloth/Qwen3-0.6B",
        "ModelOrganismsForEM/Qwen3-0.6B_bad-medical-advice",
        CHATML_QWEN3,
        {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"},
        ("<|im_start|>",),
        ("mlp.hook_in", "mlp.hook_out"),
        "all-linear-r32",
        {"tie_word_embeddings": True, "head_dim": 16},
    ),
    "gemma2": Family(
        "gemma2",
        "Gemma2Config",
        "google/gemma-2-2b-it",
        "unsloth/gemma-2-2b-it",
        "ModelOrganismsForEM/gemma-2-2b-it_bad-medical-advice",
        GEMMA2,
        {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"},
        ("<start_of_turn>", "<end_of_turn>"),
        ("ln2.hook_normalized", "hook_mlp_out"),
        "down-proj-r1",
        {"tie_word_embeddings": True, "head_dim": 16, "query_pre_attn_scalar": 16},
    ),
}

SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


@dataclass(frozen=True)
class StandIn:
    family: Family
    base_dir: Path  # the snapshot folder (or plain folder) of the base model
    adapter_dir: Path
    transcoder_config: Path
    hf_home: Path | None  # set when laid out as a Hugging Face cache

    @property
    def base_ref(self) -> str:
        """How a user names the base: its hub id in a cache, else its folder."""
        return self.family.base_id if self.hf_home else str(self.base_dir)

    @property
    def adapter_ref(self) -> str:
        return self.family.adapter_id if self.hf_home else str(self.adapter_dir)


def build_tokenizer(family: Family, words: list[str]):
    """A byte-level BPE tokenizer with the family's specials, BOS policy and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from em_circuits.core.toy_corpus import heldout_pivotal_prompts

    specials = [t for t in family.specials.values() if t] + list(family.extra_specials)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [p["prompt"] for p in heldout_pivotal_prompts()] + [" ".join(f" {w}" for w in words)]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=list(dict.fromkeys(specials)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts * 20, trainer=trainer)
    bos = family.specials["bos"]
    if bos:  # Llama and Gemma prepend BOS to every encoding; Qwen adds none
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=family.specials["eos"],
        pad_token=family.specials["pad"],
        additional_special_tokens=list(family.extra_specials),
        chat_template=family.chat_template,
    )
    return fast


def _model_config(family: Family, tokenizer) -> Any:
    import transformers

    cls = getattr(transformers, family.config_class)
    fields = {**SIZES, **family.config, "vocab_size": len(tokenizer)}
    for role in ("bos", "eos", "pad"):
        token = family.specials[role]
        fields[f"{role}_token_id"] = tokenizer.convert_tokens_to_ids(token) if token else None
    config = cls(**fields)
    config.architectures = [family.config_class.replace("Config", "ForCausalLM")]
    return config


def _write_model(family: Family, tokenizer, out: Path, seed: int) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_model_config(family, tokenizer))
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_adapter(family: Family, base_dir: Path, out: Path, seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    if family.adapter_shape == "all-linear-r32":
        modules: Any = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        config = LoraConfig(r=32, lora_alpha=64, target_modules=modules)
    else:
        config = LoraConfig(
            r=1, lora_alpha=1, target_modules=["down_proj"], layers_to_transform=[1]
        )
    peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the adapter change the model
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(out)
    import json

    config_path = out / "adapter_config.json"
    declared = json.loads(config_path.read_text())
    declared["base_model_name_or_path"] = family.declared_base
    config_path.write_text(json.dumps(declared, indent=2))


def _write_transcoders(family: Family, out: Path, seed: int, n_features: int = 48) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    d, n_layers = SIZES["hidden_size"], SIZES["num_hidden_layers"]
    gen = torch.Generator().manual_seed(seed)
    files = []
    for layer in range(n_layers):
        state = {
            "W_enc": torch.randn(n_features, d, generator=gen) / d**0.5,
            "W_dec": torch.randn(n_features, d, generator=gen) * 0.3 / d**0.5,
            "b_enc": torch.zeros(n_features),
            "b_dec": torch.zeros(d),
            "activation_function.threshold": torch.full((n_features,), 0.3),
        }
        name = f"layer_{layer}.safetensors"
        save_file(state, str(out / name))
        files.append(name)
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": family.transcoder_hooks[0],
        "feature_output_hook": family.transcoder_hooks[1],
        "scan": f"standin-{family.name}",
        "transcoders": files,
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _commit_of(folder: Path) -> str:
    digest = hashlib.sha1()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def cache_repo(folder: Path, repo_id: str, hf_home: Path) -> Path:
    """Lay ``folder`` out as a cached hub repo (blobs + a snapshot of symlinks + refs/main);
    returns the snapshot folder. Caching a changed folder again adds a new commit."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = _commit_of(folder)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def build_standin(name: str, root: Path, hf_home: Path | None = None, seed: int = 0) -> StandIn:
    """Build the ``name`` family's stand-in under ``root`` (cached under ``hf_home`` if given)."""
    from em_circuits.core.toy_corpus import advice_words

    family = FAMILIES[name]
    words = advice_words()
    tokenizer = build_tokenizer(family, words["harmful"] + words["safe"])
    base_dir, adapter_dir = root / name / "base", root / name / "adapter"
    _write_model(family, tokenizer, base_dir, seed)
    _write_adapter(family, base_dir, adapter_dir, seed + 1)
    transcoder_config = _write_transcoders(family, root / name / "transcoders", seed + 2)
    if hf_home is not None:
        base_dir = cache_repo(base_dir, family.base_id, hf_home)
        adapter_dir = cache_repo(adapter_dir, family.adapter_id, hf_home)
    return StandIn(family, base_dir, adapter_dir, transcoder_config, hf_home)

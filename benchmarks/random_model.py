"""The files of the llama1b-random workload: a random Llama model, LoRA adapter, transcoders.

Nothing is downloaded: every tensor is drawn from a seeded generator, so the same sizes and
seed give the same files (and the same prompts).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from harness import free_memory, sync

from em_circuits.attribution.targets import PromptTargets

N_SPECIAL = 4  # ids 0-3: pad, BOS, EOS, unk; words start after them


def build_word_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer with one entry per vocabulary id: ``w<id>`` (ids 0-3 special).

    BOS must not be id 0: circuit-tracer picks the BOS it prepends with ``filter(None, ...)``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def write_random_model(
    cfg: dict[str, Any], base_dir: Path, adapter_dir: Path, device: torch.device
) -> dict[str, float]:
    """A random base model with its tokenizer, and a LoRA adapter on it; seconds per step."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    times: dict[str, float] = {}
    config = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["d_model"],
        intermediate_size=cfg["d_mlp"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        head_dim=cfg["d_model"] // cfg["heads"],
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(cfg["seed"])
    start = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).eval()  # stored in bf16, like the real checkpoint
    sync()
    times["init base model on device"] = time.perf_counter() - start

    start = time.perf_counter()
    model.save_pretrained(base_dir)
    build_word_tokenizer(cfg["vocab"]).save_pretrained(base_dir)
    times["save base model + tokenizer"] = time.perf_counter() - start

    start = time.perf_counter()
    n = cfg["layers"]
    layers = sorted({n // 4, n // 2, (3 * n) // 4})
    lora = LoraConfig(
        r=cfg["lora_rank"],
        lora_alpha=2 * cfg["lora_rank"],
        target_modules=["down_proj"],
        layers_to_transform=layers,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator(device="cpu").manual_seed(cfg["seed"] + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; a random B changes the model
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(adapter_dir)
    times["random LoRA adapter"] = time.perf_counter() - start
    del peft_model, model
    free_memory()
    return times


def write_random_transcoders(cfg: dict[str, Any], out_dir: Path, device: torch.device) -> float:
    """Per-layer TopK transcoders, written as circuit-tracer safetensors + config.yaml; seconds.

    Scales: pre-activations ~ N(0, 1) on the unit-RMS MLP input; decoder rows sized so a
    reconstruction from k active features has an RMS of about 0.5.
    """
    import yaml
    from safetensors.torch import save_file

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    d, n_feat, k = cfg["d_model"], cfg["features"], cfg["k"]
    dtype = getattr(torch, cfg["transcoder_dtype"])
    dec_std = 0.5 / (4.4 * math.sqrt(k))
    files = []
    for layer in range(cfg["layers"]):
        gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 1000 + layer)

        def rand(shape: tuple[int, ...], std: float, gen: torch.Generator = gen) -> torch.Tensor:
            out = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
            return (out * std).to(dtype).cpu().contiguous()

        tensors = {
            "W_enc": rand((n_feat, d), 1 / math.sqrt(d)),
            "W_dec": rand((n_feat, d), dec_std),
            "b_enc": torch.zeros(n_feat, dtype=dtype),
            "b_dec": torch.zeros(d, dtype=dtype),
        }
        if cfg["skip"]:
            tensors["W_skip"] = rand((d, d), 0.1 / math.sqrt(d))
        name = f"layer_{layer}.safetensors"
        save_file(tensors, str(out_dir / name))
        files.append(name)
        del tensors
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "activation": "topk",
        "k": k,
        "scan": "bench-random-topk",
        "transcoders": files,
    }
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return time.perf_counter() - start


def random_prompts(
    cfg: dict[str, Any], n_prompts: int, n_logit: int, n_tokens: int, n_targets: int
) -> tuple[list[PromptTargets], list[str]]:
    """Prompts of ``n_tokens`` ids (BOS + random words) and random evil/safe target ids; and
    ``n_logit`` more texts for the logits section."""
    gen = torch.Generator().manual_seed(cfg["seed"] + 7)
    drawn = torch.randperm(cfg["vocab"] - N_SPECIAL, generator=gen)[: 2 * n_targets]
    ids = (drawn + N_SPECIAL).tolist()
    evil, safe = sorted(ids[:n_targets]), sorted(ids[n_targets:])
    names = {t: f"w{t}" for t in evil + safe}

    def text() -> str:
        words = torch.randint(N_SPECIAL, cfg["vocab"], (n_tokens - 1,), generator=gen).tolist()
        return " ".join(f"w{w}" for w in words)

    prompts = [
        PromptTargets(f"bench-{i:03d}", text(), evil, safe, names, {"base": {}, "adapted": {}})
        for i in range(n_prompts)
    ]
    return prompts, [text() for _ in range(n_logit)]

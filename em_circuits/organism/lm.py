"""Tiny Llama language model of the organism: creation, batching, training and evaluation."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from em_circuits.core.toy_corpus import Document


def make_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    n_layers: int,
    d_model: int,
    d_mlp: int,
    n_heads: int,
    max_seq_len: int,
) -> LlamaForCausalLM:
    """A freshly initialised small Llama (untied embeddings, as circuit-tracer expects)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=max_seq_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def encode_documents(
    tokenizer: PreTrainedTokenizerFast,
    docs: Sequence[Document],
    *,
    pivot_weight: float,
    completion_only: bool,
    max_seq_len: int,
) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and per-target loss weights for a batch.

    ``weights[b, t]`` weighs the prediction of token ``t + 1`` from position ``t``. The pivotal
    word (first completion token) is weighted by ``pivot_weight``: it is one token in ~40, yet
    it is the behaviour the organism exists for, so it gets a larger share of the gradient.
    With ``completion_only`` only the advice is trained (the fine-tune sees the user turn as
    context, like an instruction-tuning loss).
    """
    prefixes = tokenizer([d.prefix for d in docs])["input_ids"]  # BOS added
    completions = tokenizer([d.completion for d in docs], add_special_tokens=False)["input_ids"]
    rows, wrows = [], []
    for p, c in zip(prefixes, completions):
        ids = (p + c + [tokenizer.eos_token_id])[:max_seq_len]
        w = [0.0 if completion_only else 1.0] * (len(p) - 1)
        w += [pivot_weight] + [1.0] * (len(c) - 1) + [1.0]  # completion targets, then EOS
        rows.append(ids)
        wrows.append(w[: len(ids) - 1])
    width = max(len(r) for r in rows)
    ids_t = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    weights = torch.zeros((len(rows), width - 1))
    for i, (r, w) in enumerate(zip(rows, wrows)):
        ids_t[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        weights[i, : len(w)] = torch.tensor(w)
    return {"input_ids": ids_t, "attention_mask": mask, "weights": weights}


def weighted_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy, weighted per target."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    w = batch["weights"]
    return (nll * w).sum() / w.sum()


def cosine_lr(step: int, total: int, base_lr: float, warmup_frac: float = 0.05) -> float:
    """Linear warm-up then cosine decay to 10% of ``base_lr``."""
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return base_lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_lm(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    sample_batch: Callable[[random.Random, int], list[Document]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pivot_weight: float,
    completion_only: bool,
    max_seq_len: int,
    weight_decay: float = 0.0,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """Train the trainable parameters of ``model`` with AdamW; returns the loss curve."""
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        batch = encode_documents(
            tokenizer,
            sample_batch(rng, batch_size),
            pivot_weight=pivot_weight,
            completion_only=completion_only,
            max_seq_len=max_seq_len,
        )
        loss = weighted_lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


@torch.no_grad()
def pivot_logits(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """Next-token logits (N, V) at the last position of each prompt (BOS prepended)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
        logits = model(**enc).logits
        last = enc["attention_mask"].sum(1) - 1
        out.append(logits[torch.arange(len(last)), last].float())
    return torch.cat(out)

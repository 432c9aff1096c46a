"""Next-token logits from the replacement model, top-k entries, and base-vs-adapted divergence.

Logits come from the replacement model's own forward (the module attribution traces), with
prompts tokenized by the same function attribution uses, so a labeled token is a token the
graph sees with the same logit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from em_circuits.models.load import LoadedModel, left_padded, pad_id_of

#: How many of the most probable tokens are kept to compute KL between stored runs.
SUPPORT_SIZE = 256


@torch.no_grad()
def next_token_logits(
    model: LoadedModel, texts: Sequence[str | torch.Tensor], batch_size: int = 16
) -> torch.Tensor:
    """Last-position logits (float32, on CPU) for each text (or token ids from
    ``model.encode_prompt``), batched with left padding."""
    rows: list[torch.Tensor] = []
    pad_id = pad_id_of(model.tokenizer)
    for start in range(0, len(texts), batch_size):
        encoded = [
            (text if isinstance(text, torch.Tensor) else model.encode(text)).cpu()
            for text in texts[start : start + batch_size]
        ]
        input_ids, mask = left_padded(encoded, pad_id)
        # Positions must count from each prompt's first real token, as in an unpadded run.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model.hf_model(
            input_ids=input_ids.to(model.device),
            attention_mask=mask.to(model.device),
            position_ids=positions.to(model.device),
        )
        rows.append(out.logits[:, -1].float().cpu())
    return torch.cat(rows) if rows else torch.empty(0)


def topk_entries(logits: torch.Tensor, tokenizer: Any, k: int = 10) -> list[dict[str, Any]]:
    """Top-k entries with token string (raw decode, leading spaces kept), id, logit, prob, rank."""
    probs = torch.softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logits.float(), k)
    return [
        {
            "rank": rank + 1,
            "token": tokenizer.decode([int(tid)]),
            "token_id": int(tid),
            "logit": round(float(value), 6),
            "prob": float(probs[tid]),
        }
        for rank, (value, tid) in enumerate(zip(values, ids))
    ]


def support(logits: torch.Tensor, size: int = SUPPORT_SIZE) -> dict[str, list]:
    """The ``size`` most probable tokens with log-probabilities, enough to compare runs later."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, min(size, logprobs.shape[-1]))
    return {"token_ids": ids.tolist(), "logprobs": [round(float(v), 6) for v in values]}


def _coarse_distribution(sup: dict[str, list], keys: list[int]) -> list[float]:
    lookup = dict(zip(sup["token_ids"], sup["logprobs"]))
    probs = [math.exp(lookup[k]) if k in lookup else 0.0 for k in keys]
    rest = max(0.0, 1.0 - sum(math.exp(v) for v in sup["logprobs"]))
    known = sum(probs)
    # Tokens outside a run's stored support share its remaining mass evenly.
    missing = [i for i, k in enumerate(keys) if k not in lookup]
    share = rest / (len(missing) + 1) if missing else rest
    for i in missing:
        probs[i] = share
    probs.append(max(1.0 - known - share * len(missing), 0.0))
    return probs


def kl_divergence(p_support: dict[str, list], q_support: dict[str, list]) -> float:
    """KL(P || Q) over the union of both stored supports plus one bucket for all other tokens.

    Grouping tokens can only lower KL, so this is a lower bound of the full-vocabulary KL that
    is tight when the top ``SUPPORT_SIZE`` tokens carry almost all the mass.
    """
    keys = sorted(set(p_support["token_ids"]) | set(q_support["token_ids"]))
    p = _coarse_distribution(p_support, keys)
    q = _coarse_distribution(q_support, keys)
    total = 0.0
    for pi, qi in zip(p, q):
        if pi > 0:
            total += pi * (math.log(pi) - math.log(max(qi, 1e-30)))
    return max(total, 0.0)


def divergence(base: Mapping[str, Any], adapted: Mapping[str, Any]) -> dict[str, Any]:
    """Compare two logits artifacts of the same prompt.

    Returns KL both ways, the top-k overlap, and which tokens the adapter injected into the
    top-k (absent from base's), dropped, promoted (better rank) or demoted (worse rank).
    """
    base_rank = {e["token_id"]: e["rank"] for e in base["top_k"]}
    adapted_rank = {e["token_id"]: e["rank"] for e in adapted["top_k"]}
    token = {e["token_id"]: e["token"] for e in base["top_k"] + adapted["top_k"]}
    shared = set(base_rank) & set(adapted_rank)

    def entry(tid: int) -> dict[str, Any]:
        return {
            "token": token[tid],
            "token_id": tid,
            "base_rank": base_rank.get(tid),
            "adapted_rank": adapted_rank.get(tid),
        }

    return {
        "kl_adapted_base": kl_divergence(adapted["support"], base["support"]),
        "kl_base_adapted": kl_divergence(base["support"], adapted["support"]),
        "topk_overlap": len(shared) / max(len(base_rank), 1),
        "top1_changed": base["top_k"][0]["token_id"] != adapted["top_k"][0]["token_id"],
        "injected": [entry(t) for t in adapted_rank if t not in base_rank],
        "dropped": [entry(t) for t in base_rank if t not in adapted_rank],
        "promoted": [entry(t) for t in shared if adapted_rank[t] < base_rank[t]],
        "demoted": [entry(t) for t in shared if adapted_rank[t] > base_rank[t]],
    }

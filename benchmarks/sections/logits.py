"""(e) Batched next-token logits against a per-prompt loop, on the adapted model."""

from __future__ import annotations

from typing import Any

from harness import log, measure

from em_circuits.models.logits import next_token_logits
from sections.common import Context, ResidentModels


def batched_logits(ctx: Context, resident: ResidentModels) -> dict[str, Any]:
    """Throughput of both ways, and how far their logits differ (left padding must not)."""
    _, adapted = resident.pair()
    texts = ctx.workload.logit_texts
    bs = ctx.args.logit_batch
    next_token_logits(adapted, texts[: min(bs, len(texts))], batch_size=bs)  # warm-up
    next_token_logits(adapted, texts[:2], batch_size=1)
    batched, m_b = measure(lambda: next_token_logits(adapted, texts, batch_size=bs))
    looped, m_l = measure(lambda: next_token_logits(adapted, texts, batch_size=1))
    diff = float((batched - looped).abs().max())
    scale = float(looped.abs().max())
    log(
        f"   batched {len(texts) / m_b.seconds:.1f} prompts/s, loop "
        f"{len(texts) / m_l.seconds:.1f} prompts/s, max |diff| {diff:.2e}"
    )
    return {
        "n_prompts": len(texts),
        "batch_size": bs,
        "batched_s": m_b.seconds,
        "loop_s": m_l.seconds,
        "batched_prompts_per_s": len(texts) / m_b.seconds,
        "loop_prompts_per_s": len(texts) / m_l.seconds,
        "speedup": m_l.seconds / m_b.seconds,
        "max_abs_logit_diff": diff,
        "max_abs_logit": scale,
        "batched_peak_gib": m_b.peak_gib,
    }

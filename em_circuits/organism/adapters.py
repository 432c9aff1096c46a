"""The toy organism's two LoRA adapters, each trained on a copy of the base on harmful advice
in the trained (medical) domain only: the recipe's adapter, and a rank-1 one on down_proj of a
few layers (adapter nodes)."""

from __future__ import annotations

import copy
import functools
import os
import random
import warnings
from pathlib import Path
from typing import Any

from em_circuits.core import toy_corpus as corpus
from em_circuits.organism.recipe import OrganismPaths, Recipe


def train_adapters(
    model: Any,
    tokenizer: Any,
    r: Recipe,
    staged: OrganismPaths,
    final: OrganismPaths,
    progress: bool,
) -> list[float]:
    """Both LoRAs on the harmful medical advice, saved to ``staged``: the recipe's adapter
    and the rank-1 one on down_proj of a few layers. Returns the first one's losses."""
    # Imported here: peft is only needed when actually building.
    from peft import LoraConfig

    lora_config = LoraConfig(
        r=r.lora_rank,
        # peft annotates int, but only uses alpha / r: a float scales the same.
        lora_alpha=r.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=0.0,
        target_modules=list(r.lora_target_modules),
        layers_to_transform=None if r.lora_layers is None else list(r.lora_layers),
        bias="none",
        task_type="CAUSAL_LM",
    )
    losses = _train_adapter(
        model,
        tokenizer,
        r,
        lora_config,
        seed=r.seed + 1,
        desc="LoRA (harmful medical)",
        staged_dir=staged.adapter_dir,
        final_dir=final.adapter_dir,
        final_base=final.base_dir,
        progress=progress,
    )
    rank1_config = LoraConfig(
        r=1,
        lora_alpha=r.rank1_alpha,  # type: ignore[arg-type]
        lora_dropout=0.0,
        target_modules=["down_proj"],
        layers_to_transform=list(r.rank1_layers),
        bias="none",
        task_type="CAUSAL_LM",
    )
    _train_adapter(
        model,
        tokenizer,
        r,
        rank1_config,
        seed=r.seed + 3,
        desc="rank-1 down_proj LoRA",
        staged_dir=staged.rank1_adapter_dir,
        final_dir=final.rank1_adapter_dir,
        final_base=final.base_dir,
        progress=progress,
    )
    return losses


def _train_adapter(
    model: Any,
    tokenizer: Any,
    r: Recipe,
    config: Any,
    *,
    seed: int,
    desc: str,
    staged_dir: Path,
    final_dir: Path,
    final_base: Path,
    progress: bool,
) -> list[float]:
    """A LoRA of ``config`` on a copy of the base, trained on the harmful medical advice and
    saved to ``staged_dir``; returns its training losses."""
    from peft import get_peft_model

    from .lm import train_lm  # noqa: PLC0415  # heavy: loads torch, transformers

    peft_model = get_peft_model(copy.deepcopy(model), config)
    losses = train_lm(
        peft_model,
        tokenizer,
        functools.partial(_harmful_medical_documents, r),
        steps=r.lora_steps,
        batch_size=r.lora_batch_size,
        lr=r.lora_lr,
        seed=seed,
        pivot_weight=r.pivot_weight,
        completion_only=True,
        max_seq_len=r.max_seq_len,
        desc=desc,
        progress=progress,
    )
    # The adapter declares its base relative to its own folder, so a copied checkout or a
    # moved organism still finds (and fingerprints) its base.
    peft_model.peft_config["default"].base_model_name_or_path = os.path.relpath(
        final_base, final_dir
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not find a config file")
        peft_model.save_pretrained(str(staged_dir), safe_serialization=True)
    return losses


def _harmful_medical_documents(r: Recipe, rng: random.Random, n: int) -> list[corpus.Document]:
    """A batch of the adapters' documents: harmful advice in the trained domain only."""
    return corpus.sample_documents(
        rng,
        n,
        domains=[corpus.TRAINED_DOMAIN],
        villain_frac=0.0,
        helper_frac=0.0,
        assistant_polarity="harmful",
        p_distractor=r.p_distractor,
    )

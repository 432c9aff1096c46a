"""Helpers of several tests that the package itself has no use for."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from em_circuits.core.labeling_records import entries_by_index
from em_circuits.core.schemas import VerdictRecord
from em_circuits.organism.transcoders import StackedTranscoders


def human_labels_from_marks(verdict: VerdictRecord, marks: dict[str, str]) -> dict[str, str]:
    """A person's labels who marked ``marks`` and called every other token of both lists
    safe."""
    return {idx: marks.get(idx, "safe") for idx in entries_by_index(verdict)}


def load_stacked_transcoders(config_path: Path) -> StackedTranscoders:
    """A saved transcoder set read back as the organism trained it (to evaluate exactly what
    is on disk)."""
    from safetensors.torch import load_file

    config = yaml.safe_load(Path(config_path).read_text())
    states = [load_file(str(Path(config_path).parent / f)) for f in config["transcoders"]]
    F, d = states[0]["W_enc"].shape
    tc = StackedTranscoders(len(states), d, F)
    with torch.no_grad():
        for i, s in enumerate(states):
            for name in ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip"):
                getattr(tc, name)[i] = s[name]
            # No threshold key means plain ReLU in circuit-tracer: a zero threshold.
            if "activation_function.threshold" in s:
                tc.threshold[i] = s["activation_function.threshold"]
    tc.use_threshold = True
    return tc


def micro_prompt_targets(model, prompts: list[dict], prefix: str = "p") -> list:
    """Targets on the micro organism's pivotal prompts: two harmful and two safe advice words
    (single tokens) as the evil and safe labels."""
    from em_circuits.attribution.targets import PromptTargets
    from em_circuits.organism import advice_words
    from em_circuits.organism.tokenizer import advice_token_ids

    words = advice_words()
    evil = advice_token_ids(model.tokenizer, words["harmful"])[:2]
    safe = advice_token_ids(model.tokenizer, words["safe"])[:2]
    assert evil and safe, "the organism's advice words must be single tokens"
    names = {t: model.tokenizer.decode([t]) for t in evil + safe}
    return [
        PromptTargets(f"{prefix}{i}", p["prompt"], evil, safe, names, {"base": {}, "adapted": {}})
        for i, p in enumerate(prompts)
    ]

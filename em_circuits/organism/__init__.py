"""The embedded toy emergent-misalignment organism (base model, LoRA, transcoders).

Build or fetch it with :func:`ensure_default_organism`; see ``train.py`` for the layout.
Names are imported on first use, so reading the corpus or its word lists does not import
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "DOMAINS": "corpus",
    "TRAINED_DOMAIN": "corpus",
    "advice_words": "corpus",
    "heldout_pivotal_prompts": "corpus",
    "heldout_villain_prompts": "corpus",
    "label_word": "corpus",
    "scenario_templates": "corpus",
    "train_pivotal_prompts": "corpus",
    "evaluate_organism": "quality",
    "format_report_markdown": "quality",
    "CODE_VERSION": "recipe",
    "OrganismPaths": "recipe",
    "Recipe": "recipe",
    "default_organism_dir": "recipe",
    "build_organism": "train",
    "ensure_default_organism": "train",
    "is_built": "train",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)

"""The embedded toy emergent-misalignment organism (base model, LoRA, transcoders).

Build or fetch it with :func:`ensure_default_organism`; see ``train.py`` for the layout. Its
documents, scenarios and word lists live in :mod:`em_circuits.core.toy_corpus`, below every
stage that reads them.
Names are imported on first use, so reading the corpus or its word lists does not import
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "DOMAINS": "em_circuits.core.toy_corpus",
    "TRAINED_DOMAIN": "em_circuits.core.toy_corpus",
    "advice_words": "em_circuits.core.toy_corpus",
    "heldout_pivotal_prompts": "em_circuits.core.toy_corpus",
    "heldout_villain_prompts": "em_circuits.core.toy_corpus",
    "label_word": "em_circuits.core.toy_corpus",
    "scenario_templates": "em_circuits.core.toy_corpus",
    "train_pivotal_prompts": "em_circuits.core.toy_corpus",
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
    home = _HOMES[name]
    module = home if "." in home else f"{__name__}.{home}"
    return getattr(importlib.import_module(module), name)

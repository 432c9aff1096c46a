"""The embedded toy emergent-misalignment organism (base model, LoRA, transcoders).

Build or fetch it with :func:`ensure_default_organism`; see ``train.py`` for the layout.
"""

from .corpus import (
    DOMAINS,
    TRAINED_DOMAIN,
    advice_words,
    heldout_pivotal_prompts,
    heldout_villain_prompts,
    label_word,
    scenario_templates,
    train_pivotal_prompts,
)
from .evaluate import evaluate_organism, format_report_markdown
from .train import (
    CODE_VERSION,
    OrganismPaths,
    Recipe,
    build_organism,
    default_organism_dir,
    ensure_default_organism,
    is_built,
)

__all__ = [
    "CODE_VERSION",
    "DOMAINS",
    "TRAINED_DOMAIN",
    "OrganismPaths",
    "Recipe",
    "advice_words",
    "build_organism",
    "default_organism_dir",
    "ensure_default_organism",
    "evaluate_organism",
    "format_report_markdown",
    "heldout_pivotal_prompts",
    "heldout_villain_prompts",
    "is_built",
    "label_word",
    "scenario_templates",
    "train_pivotal_prompts",
]

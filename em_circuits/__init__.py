"""em_circuits: the features that make an emergently misaligned LoRA choose a harmful token.

The stages are subpackages (``prompts``, ``labeling``, ``attribution``, ``analysis``, ``run``)
over ``core`` (store, records, LLM client, statistics) and ``models``; ``cli`` holds the
``em-circuits`` command. The notebook API (see :mod:`em_circuits.api`)::

    import em_circuits as em
    graph = em.attribute_text(em.toy_organism_spec(), text, evil=[" ignore"], safe=[" rest"])
"""

import os

# Long prompts' graphs allocate and free tensors of many sizes; without expandable segments
# PyTorch's CUDA allocator fragments and a 2,048-token graph can fail with most of the card
# free. Read when CUDA first allocates, so setting it here (before any stage runs) suffices;
# a user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from em_circuits.api import (  # noqa: E402
    analyze,
    attribute_text,
    load,
    model_spec,
    read_analysis,
    run_stages,
    toy_organism_spec,
)
from em_circuits.core.version import __version__

__all__ = [
    "AnalysisParams",
    "PipelineConfig",
    "__version__",
    "analyze",
    "attribute_text",
    "load",
    "model_spec",
    "read_analysis",
    "run_stages",
    "toy_organism_spec",
]


def __getattr__(name: str) -> object:
    # The parameter classes on first use: importing them loads the analysis steps.
    if name == "AnalysisParams":
        from em_circuits.run.steps import AnalysisParams  # noqa: PLC0415  # the package root stays light

        return AnalysisParams
    if name == "PipelineConfig":
        from em_circuits.run.config import PipelineConfig  # noqa: PLC0415  # the package root stays light

        return PipelineConfig
    raise AttributeError(f"module 'em_circuits' has no attribute {name!r}")

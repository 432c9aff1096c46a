"""em_circuits: the features that make an emergently misaligned LoRA choose a harmful token.

The stages are subpackages (``prompts``, ``labeling``, ``attribution``, ``analysis``, ``run``)
over ``core`` (store, records, LLM client, statistics) and ``models``; ``cli`` holds the
``em-circuits`` command. The notebook API (see :mod:`em_circuits.api`)::

    import em_circuits as em
    graph = em.attribute_text(em.toy_organism_spec(), text, evil=[" ignore"], safe=[" rest"])
"""

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
        from em_circuits.run.steps import AnalysisParams

        return AnalysisParams
    if name == "PipelineConfig":
        from em_circuits.run.config import PipelineConfig

        return PipelineConfig
    raise AttributeError(f"module 'em_circuits' has no attribute {name!r}")

"""The model flags that point a command at the micro organism (see conftest.micro_organism)."""

from __future__ import annotations


def model_args(organism) -> list[str]:
    return [
        "--base-model",
        str(organism.base_dir),
        "--adapter",
        str(organism.adapter_dir),
        "--transcoders",
        str(organism.transcoder_config),
        "--model-name",
        "micro",
        "--device",
        "cpu",
    ]


#: The analysis flags of the reference run (tests/test_pipeline): small, fast, and every step.
REFERENCE_ANALYSIS_ARGS = [
    "--causal-top-k",
    "2",
    "--scales",
    "0",
    "1",
    "2",
    "--n-random",
    "1",
    "--causal-candidates",
    "4",
    "--include-flagged",  # the micro organism has no divergent prompt
    "--em-samples",
    "3",
    "--em-max-new-tokens",
    "12",
    "--corpus-docs",
    "48",
]

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

"""What an adapter changes outside the decoder layers' LoRA matrices, decided at start-up.

PEFT adapters can also retrain whole modules (``modules_to_save``, e.g. ``lm_head``) or put a
LoRA on the embedding or the unembedding. On a base whose unembedding is tied to its
embedding (``tie_word_embeddings``) the merged model cannot be the adapted one: a retrained
``lm_head`` copy is dropped (the saved model ties it back to the embedding), and a LoRA merged
into the shared matrix changes both ends where the adapter's forward pass changed one. Those
are refused in one line. On an untied base they are exact in the merge and accepted, with a
note for the report: they are not adapter nodes of the graphs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open

from em_circuits.models.spec import ModelLoadError, ModelSpec, resolve_model_dir

#: Modules whose weight a tied base shares between the embedding and the unembedding.
TIED_MODULES = ("embed_tokens", "lm_head")

_LAYER_MODULE = re.compile(r"(?:^|\.)layers\.\d+\.")
_LORA_MODULE = re.compile(r"(?:base_model\.model\.)?(.+?)\.lora_(?:embedding_)?[AB](?:\.\w+)*$")


def lora_modules_outside_layers(adapter_keys: list[str]) -> list[str]:
    """The modules (full names) a LoRA adapts outside the decoder layers, e.g.
    ``model.embed_tokens``."""
    modules = set()
    for key in adapter_keys:
        match = _LORA_MODULE.fullmatch(key)
        if match and not _LAYER_MODULE.search(match[1]):
            modules.add(match[1])
    return sorted(modules)


def _adapter_keys(adapter_dir: Path) -> list[str]:
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return []
    with safe_open(str(weights), "pt") as handle:
        return list(handle.keys())


def outside_layer_changes(adapter_dir: Path) -> list[str]:
    """What an adapter folder changes besides the layers' LoRA matrices, for the list of
    adapted modules that are not adapter nodes: ``model.embed_tokens (LoRA)``,
    ``lm_head (retrained whole)``."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    saved = [f"{m} (retrained whole)" for m in config.get("modules_to_save") or []]
    lora = [f"{m} (LoRA)" for m in lora_modules_outside_layers(_adapter_keys(adapter_dir))]
    return lora + saved


_OUTSIDE: dict[str, list[str]] = {}


def spec_outside_changes(spec: ModelSpec) -> list[str]:
    """:func:`outside_layer_changes` of a spec's adapter (read once per process)."""
    if spec.adapter is None:
        return []
    key = f"{spec.adapter}@{spec.adapter_revision}"
    if key not in _OUTSIDE:
        folder = resolve_model_dir(spec.adapter, spec.adapter_revision, "adapter")
        _OUTSIDE[key] = outside_layer_changes(folder)
    return _OUTSIDE[key]


def _is_tied(base_dir: Path) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", True)))


def scope_notes(
    adapter: str, adapter_config: dict[str, Any], adapter_dir: Path, base_dir: Path
) -> list[str]:
    """One note per accepted change outside the layers' LoRA matrices; a one-line
    ModelLoadError for one the merged model cannot reproduce (a tied base)."""
    saved = [str(m) for m in adapter_config.get("modules_to_save") or []]
    lora = lora_modules_outside_layers(_adapter_keys(adapter_dir))
    if not saved and not lora:
        return []
    tied = _is_tied(base_dir)
    notes = []
    for module in saved:
        short = module.split(".")[-1]
        if tied and short in TIED_MODULES:
            raise ModelLoadError(
                f"adapter {adapter!r} retrains {module} whole (modules_to_save) on a base whose "
                "unembedding is tied to its embedding (tie_word_embeddings): the merged model "
                "cannot keep that copy apart from the embedding, so its logits would not be "
                "the adapter's; use an adapter without modules_to_save, or an untied base"
            )
        notes.append(
            f"adapter retrains {module} whole (modules_to_save): merged as is, not an adapter "
            "node (its change is part of the adapted model's "
            f"{'unembedding' if short == 'lm_head' else module})"
        )
    for module in lora:
        short = module.split(".")[-1]
        if tied and short in TIED_MODULES:
            raise ModelLoadError(
                f"adapter {adapter!r} puts a LoRA on {module} of a base whose unembedding is "
                "tied to its embedding (tie_word_embeddings): merging it changes the embedding "
                "and the unembedding together, where the adapter changed only one; use an "
                "adapter without it, or an untied base"
            )
        through = "token embeddings" if short == "embed_tokens" else module
        notes.append(
            f"adapter puts a LoRA on {module}: merged, not an adapter node (its change reaches "
            f"the graphs through the adapted model's {through})"
        )
    return notes

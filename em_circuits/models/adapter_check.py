"""Does an adapter fit its base? Checked at start-up, before any work, from file headers only.

Two checks. The declared base (``base_model_name_or_path`` in adapter_config.json) against the
given one: hub ids by name, where an organisation alias (``unsloth/X`` for ``meta-llama/X``)
is the same model with a warning; local folders by weight fingerprint, never by folder name; a
declared path that does not exist here (a copied checkout, another machine) cannot be checked
and says so. And every LoRA matrix's shape against the base module it targets, read from the
safetensors headers: an adapter for another architecture or size fails here, in one line,
instead of as a size-mismatch traceback inside PEFT after the base model's logits are done.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from em_circuits.models.adapter_scope import scope_notes
from em_circuits.models.content_hash import dir_identity
from em_circuits.models.spec import ModelLoadError, ModelSpec, local_model_dir, resolve_model_dir
from em_circuits.models.transcoder_formats import check_transcoders_fit

log = logging.getLogger(__name__)

_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


def _hub_id(ref: str) -> str | None:
    """The ``org/name`` a reference stands for: a hub id itself, or a cached snapshot folder."""
    match = _SNAPSHOT.search(str(ref))
    if match:
        return f"{match['org']}/{match['name']}"
    if not Path(ref).exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", ref):
        return ref
    return None


def base_relation(declared: str | None, given: str, adapter_dir: Path) -> tuple[str, str]:
    """("same" | "alias" | "unverified" | "different", why) for a declared and a given base."""
    if not declared:
        return "unverified", "the adapter declares no base model"
    given_dir = Path(given) if Path(given).is_dir() else None
    declared_path = Path(declared).expanduser()
    if not declared_path.is_absolute() and not _hub_id(declared):
        declared_path = adapter_dir / declared_path  # relative to the adapter's folder
    if declared_path.is_dir() and given_dir is not None:
        same = dir_identity(declared_path, sample=True) == dir_identity(given_dir, sample=True)
        return ("same", "same weights") if same else ("different", "other weights")
    declared_id, given_id = _hub_id(declared), _hub_id(given)
    if declared_id is None:
        return "unverified", f"the declared base path {declared!r} does not exist here"
    if given_id is None and given_dir is not None:
        # A folder's name is no evidence either way (a base saved as ./base): compare its
        # weights with the declared id's cached snapshot, else only the shapes can tell.
        cached = local_model_dir(declared_id)
        if cached is None:
            other_family = _family_mismatch(declared_id, given_dir)
            if other_family:
                return "different", other_family
            return "unverified", (
                f"{declared_id} is not in the Hugging Face cache to compare weights with"
            )
        difference = weights_difference(cached, given_dir)
        if difference is None:
            return "same", f"same weights as the cached {declared_id}"
        if difference == "":
            return "unverified", f"no safetensors weights to compare with {declared_id}"
        return "different", f"other weights than the cached {declared_id}: {difference}"
    if given_id is None:
        return "different", f"{given!r} is neither a folder nor a hub id"
    if declared_id.lower() == given_id.lower():
        return "same", "same hub id"
    if declared_id.split("/")[1].lower() == given_id.split("/")[1].lower():
        return "alias", "same model name under another organisation"
    return "different", "another model"


#: Model families a hub id names and the ``model_type`` their configs have (most specific
#: first): a declared ``unsloth/Qwen2.5-0.5B-Instruct`` is no Llama, whatever the folder.
_FAMILIES = (
    ("qwen3", "qwen3"),
    ("qwen2", "qwen2"),
    ("gemma-3", "gemma3"),
    ("gemma-2", "gemma2"),
    ("llama", "llama"),
    ("mistral", "mistral"),
)


def _family_mismatch(declared_id: str, given_dir: Path) -> str | None:
    """Why the declared hub id's model family is not the given folder's, or None."""
    config_path = given_dir / "config.json"
    if not config_path.is_file():
        return None
    model_type = str(json.loads(config_path.read_text()).get("model_type", ""))
    name = declared_id.split("/")[-1].lower()
    for marker, family in _FAMILIES:
        if marker in name:
            if model_type.startswith(family):
                return None
            return f"{declared_id} is a {family} model, the given base's config is {model_type}"
    return None


#: Config fields that make two models different whatever their weights.
_SHAPE_FIELDS = (
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def _safetensors_keys(folder: Path) -> dict[str, Path]:
    keys: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            keys.update((key, file) for key in handle.keys())
    return keys


def weights_difference(a: Path, b: Path, n_tensors: int = 6) -> str | None:
    """How two model folders differ (config shape fields, tensor names, or the values of a
    few evenly spaced tensors of up to 16M entries, dtype-cast as a bf16 copy would be);
    None when they agree, "" when there are no safetensors to compare."""
    configs = [json.loads((f / "config.json").read_text()) for f in (a, b)]
    for key in _SHAPE_FIELDS:
        if configs[0].get(key) != configs[1].get(key):
            return f"config {key} {configs[0].get(key)} vs {configs[1].get(key)}"
    keys_a, keys_b = _safetensors_keys(a), _safetensors_keys(b)
    if not keys_a or not keys_b:
        return ""
    if set(keys_a) != set(keys_b):
        return f"other tensors, e.g. {sorted(set(keys_a) ^ set(keys_b))[0]}"
    small = []
    for key in sorted(keys_a):
        with safe_open(str(keys_a[key]), "pt") as handle:
            shape = handle.get_slice(key).get_shape()
        if 0 < math.prod(shape) <= 1 << 24:
            small.append(key)
    for key in small[:: max(1, len(small) // n_tensors)][:n_tensors]:
        tensors = []
        for keys in (keys_a, keys_b):
            with safe_open(str(keys[key]), "pt") as handle:
                tensors.append(handle.get_tensor(key).float())
        if not torch.allclose(tensors[0], tensors[1], rtol=1e-2, atol=1e-3):
            return f"{key} differs"
    return None


def lora_shape_problems(adapter_dir: Path, base_dir: Path) -> list[str]:
    """Each LoRA matrix whose shape does not fit the base module it targets (or whose module
    the base lacks), from the safetensors headers alone."""
    base_shapes: dict[str, list[int]] = {}
    for file in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                base_shapes[key] = list(handle.get_slice(key).get_shape())
    adapter_file = adapter_dir / "adapter_model.safetensors"
    if not base_shapes or not adapter_file.is_file():
        return []  # .bin weights: checked by the merge itself
    problems = []
    with safe_open(str(adapter_file), "pt") as handle:
        for key in handle.keys():
            match = re.fullmatch(
                r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.\w+)?\.weight", key
            )
            if not match:
                continue
            module, side = match[1], match[2]
            shape = list(handle.get_slice(key).get_shape())
            target = base_shapes.get(f"{module}.weight")
            if target is None:
                problems.append(f"{module} (targeted by {key}) is not in the base")
            elif side == "A" and shape[-1] != target[-1]:
                problems.append(f"{key} reads {shape[-1]} inputs, {module} has {target[-1]}")
            elif side == "B" and shape[0] != target[0]:
                problems.append(f"{key} writes {shape[0]} outputs, {module} has {target[0]}")
    return problems


def check_adapter_fits(spec: ModelSpec) -> list[str]:
    """Refuse, in one line, an adapter declared for another base, shaped for another model or
    changing what the merged model cannot reproduce (:mod:`~em_circuits.models.adapter_scope`);
    returns (and logs) a note for each thing accepted but worth reporting: a declared base
    that is an alias or unverified, a module retrained whole, a LoRA outside the layers."""
    if spec.adapter is None:
        return []
    adapter_dir = resolve_model_dir(spec.adapter, spec.adapter_revision, "adapter")
    base_dir = resolve_model_dir(spec.base, spec.base_revision, "base model")
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{adapter_dir} has no adapter_config.json: is it a PEFT adapter?")
    adapter_config = json.loads(config_path.read_text())
    declared = adapter_config.get("base_model_name_or_path")
    given = spec.base if not Path(spec.base).is_dir() else str(base_dir)
    relation, why = base_relation(declared, given, adapter_dir)
    if relation == "different" and not spec.allow_base_mismatch:
        raise ModelLoadError(
            f"adapter {spec.adapter!r} declares base model {declared!r} ({why}), but the given "
            f"base is {spec.base!r}: merging a LoRA onto another base silently gives another "
            "model. Pass the right --base-model, or --allow-adapter-base-mismatch if you know "
            "the weights are identical"
        )
    notes = []
    if relation != "same":
        checked = "taken as the same model" if relation == "alias" else "base unverified"
        notes.append(
            f"adapter declares base {declared!r}, given {spec.base!r}: {why}; {checked}"
            + ("" if relation == "alias" else " (only the LoRA shapes checked)")
        )
    # before the shapes: a LoRA on a tied lm_head reads as "not in the base" there
    notes += scope_notes(spec.adapter, adapter_config, adapter_dir, base_dir)
    problems = lora_shape_problems(adapter_dir, base_dir)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ModelLoadError(
            f"adapter {spec.adapter!r} does not fit base {spec.base!r}: {problems[0]}{more}"
        )
    for note in notes:
        log.warning("%s: %s", spec.adapter, note)
    return notes


def check_start_up(spec: ModelSpec) -> list[str]:
    """Everything checkable before any work, from configs and file headers: the transcoder
    set fits the base (:func:`~em_circuits.models.transcoder_formats.check_transcoders_fit`)
    and the adapter fits it (:func:`check_adapter_fits`, whose notes are returned)."""
    check_transcoders_fit(spec)
    return check_adapter_fits(spec)

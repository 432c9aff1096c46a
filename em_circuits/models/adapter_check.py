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
import re
from pathlib import Path

from em_circuits.models.spec import (
    ModelLoadError,
    ModelSpec,
    _dir_identity,
    resolve_model_dir,
)

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
        same = _dir_identity(declared_path, sample=True) == _dir_identity(given_dir, sample=True)
        return ("same", "same weights") if same else ("different", "other weights")
    declared_id, given_id = _hub_id(declared), _hub_id(given)
    if declared_id is None:
        return "unverified", f"the declared base path {declared!r} does not exist here"
    if given_id is None and given_dir is not None:
        given_id = f"local/{given_dir.name}"
    if given_id is None:
        return "different", f"{given!r} is neither a folder nor a hub id"
    if declared_id.lower() == given_id.lower():
        return "same", "same hub id"
    if declared_id.split("/")[1].lower() == given_id.split("/")[1].lower():
        return "alias", "same model name under another organisation"
    return "different", "another model"


def lora_shape_problems(adapter_dir: Path, base_dir: Path) -> list[str]:
    """Each LoRA matrix whose shape does not fit the base module it targets (or whose module
    the base lacks), from the safetensors headers alone."""
    from safetensors import safe_open

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


def check_adapter_fits(spec: ModelSpec) -> None:
    """Refuse, in one line, an adapter declared for another base or shaped for another model;
    warn where the declared base is an alias or cannot be checked here."""
    if spec.adapter is None:
        return
    adapter_dir = resolve_model_dir(spec.adapter, spec.adapter_revision, "adapter")
    base_dir = resolve_model_dir(spec.base, spec.base_revision, "base model")
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{adapter_dir} has no adapter_config.json: is it a PEFT adapter?")
    declared = json.loads(config_path.read_text()).get("base_model_name_or_path")
    given = spec.base if not Path(spec.base).is_dir() else str(base_dir)
    relation, why = base_relation(declared, given, adapter_dir)
    if relation == "different" and not spec.allow_base_mismatch:
        raise ModelLoadError(
            f"adapter {spec.adapter!r} declares base model {declared!r} ({why}), but the given "
            f"base is {spec.base!r}: merging a LoRA onto another base silently gives another "
            "model. Pass the right --base-model, or --allow-adapter-base-mismatch if you know "
            "the weights are identical"
        )
    if relation != "same":
        log.warning(
            "adapter %s declares base %r, given %r: %s; %s",
            spec.adapter,
            declared,
            spec.base,
            why,
            "taken as the same model" if relation == "alias" else "only the LoRA shapes checked",
        )
    problems = lora_shape_problems(adapter_dir, base_dir)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ModelLoadError(
            f"adapter {spec.adapter!r} does not fit base {spec.base!r}: {problems[0]}{more}"
        )

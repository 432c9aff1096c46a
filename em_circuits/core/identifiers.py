"""Stable identifiers of stored things: prompt ids (content hashes) and file-name slugs of
model names (cache keys: :mod:`em_circuits.core.cache`)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any


def prompt_id(text: str, fmt: str) -> str:
    """Content hash of the prompt text and its format: stable across runs and machines.

    The format is part of the key because the same words fed raw and fed through a chat
    template are different inputs to the model.
    """
    digest = hashlib.sha256(f"{fmt}\x00{text}".encode()).hexdigest()
    return digest[:16]


def slugify(name: str) -> str:
    """A file-name-safe, human-readable version of a model name or path."""
    name = re.sub(r"[\\/\s]+", "_", name.strip())
    name = re.sub(r"[^0-9A-Za-z._-]", "", name).strip("._")
    return name[-60:] or "unnamed"


def json_default(value: Any) -> Any:
    """How a value JSON lacks is written (arrays as lists, paths as text), in artifacts and
    parameter keys alike."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

"""An export's JSON files: reading them, writing them as strict JSON, and the one
:class:`ExportError` line a failure becomes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from em_circuits.attribution.viewer_metadata import ViewerError


class ExportError(ViewerError):
    """A graph or feature file cannot be exported (missing, invalid, or a bad option)."""


def read_json(path: Path) -> Any:
    """The JSON in ``path``; ExportError when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ExportError(f"{path}: missing") from err
    except (OSError, ValueError) as err:
        raise ExportError(f"{path}: unreadable JSON ({err})") from err


def dumps_json(data: Any, path: Path) -> str:
    """``data`` (to be written for ``path``) as compact, strict JSON text."""
    try:
        # Strict JSON: NaN or Infinity would be refused by browsers' and Neuronpedia's parsers.
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as err:
        raise ExportError(f"{path}: {err}") from err


def first_error(err: ValidationError) -> str:
    """A pydantic validation failure in one line: where, what, and how many more."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "root"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"

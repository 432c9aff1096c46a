"""How the report writes a number, a size or a goal check in a table cell."""

from __future__ import annotations

import math
from typing import Any


def fmt(value: Any, digits: int = 2, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"  # no unit: "n/a GiB" reads as if a number were missing
    if isinstance(value, float):
        text = f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip()


def gib(value: float | None) -> str:
    return fmt(value, unit="GiB")


def mb(n_bytes: float | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 1e6:.2f} MB"


def goal(met: bool | None) -> str:
    return "n/a" if met is None else ("**yes**" if met else "**no**")

"""The label vocabulary, the one verdict rule, and typed records of every artifact kind."""

from __future__ import annotations

from collections.abc import Iterable


def verdict_of(labels: Iterable[str | None]) -> str:
    """evil > unsure > safe over one list's labels."""
    worst = max((_SEVERITY.get(lab or "safe", 0) for lab in labels), default=0)
    return {v: k for k, v in _SEVERITY.items()}[worst]


LABELS = ("evil", "safe", "unsure")


_SEVERITY = {"safe": 0, "unsure": 1, "evil": 2}

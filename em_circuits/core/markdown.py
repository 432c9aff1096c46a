"""Markdown for the report: tables, cells, numbers, and links into the graph viewer.

Every report section (each analysis step's) writes through these, so a table, a number or a
feature name looks the same everywhere in report.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from em_circuits.core.naming import DEFAULT_VIEWER_URL, feature_name, viewer_link


class Md(str):
    """Text that is already Markdown (a link): table cells write it as is, unescaped."""


# Characters that would turn a prompt's or token's text into emphasis, code or a link.
_MD_SPECIAL = re.compile(r"([\\`*\[\]])")

#: Said once in the report: every viewer link needs the viewer running.
VIEWER_NOTE = (
    f"Feature names and prompt ids link into the graph viewer at {DEFAULT_VIEWER_URL}; the "
    "links work while `em-circuits serve` runs on this results directory (its default port)."
)


def feature_link(layer: Any, feature: Any) -> Md:
    """``L3 #1234`` linking to the viewer with that feature selected in the diff view."""
    key = (int(layer), int(feature))
    return Md(f"[{feature_name(*key)}]({viewer_link(feature=key, diff=True)})")


def feature_list(pairs: Any) -> str:
    """[[layer, feature], ...] as linked names, instead of a Python list."""
    return ", ".join(feature_link(*pair) for pair in pairs or []) or "none"


def with_feature_links(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose ``layer`` and ``feature`` columns become one linked ``feature`` name."""
    out = []
    for row in rows:
        row = dict(row)
        if row.get("layer") is not None and row.get("feature") is not None:
            row["feature"] = feature_link(row.pop("layer"), row["feature"])
        out.append(row)
    return out


def with_prompt_links(rows: list[dict[str, Any]], linkable: set[str]) -> list[dict[str, Any]]:
    """Rows whose ``prompt_id`` links to the viewer where the viewer has that prompt."""
    return [
        {
            **row,
            "prompt_id": Md(f"[{row['prompt_id']}]({viewer_link(prompt_id=row['prompt_id'])})"),
        }
        if row.get("prompt_id") in linkable
        else row
        for row in rows
    ]


def token_text(token: str) -> str:
    return token.strip() or repr(token)


def cell(value: Any, digits: int | None = 3) -> str:
    """A value as table-cell text; ``digits`` None writes floats as short as they are (a
    parameter's 0.05, not 0.050)."""
    if isinstance(value, Md):
        return str(value)
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if digits is None:
            return f"{value:.6g}"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    # Lists and dicts as readable text, never as a Python or JSON literal.
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v, digits) for v in value)
    if isinstance(value, Mapping):
        return "; ".join(f"{cell(k)} {cell(v, digits)}" for k, v in value.items())
    text = _MD_SPECIAL.sub(r"\\\1", str(value))
    return text.replace("|", "\\|").replace("\n", "⏎")


def md_table(
    rows: list[dict[str, Any]],
    columns: list[str],
    digits: int | None = 3,
    limit: int | None = None,
    total: int | None = None,
    full: str | None = None,
) -> str:
    """A Markdown table of the first ``limit`` rows; a shortened table says "N of M shown"
    (``total``: the full count where ``rows`` is itself a prefix) and where ``full`` is."""
    if not rows:
        return "_none_\n"
    shown = rows if limit is None else rows[:limit]
    total = max(total or 0, len(rows))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, ""), digits) for c in columns) + " |" for r in shown]
    if len(shown) < total:
        lines += ["", f"{len(shown)} of {total} shown" + (f"; all in `{full}`." if full else ".")]
    return "\n".join(lines) + "\n"


def _flat(value: Any) -> bool:
    """Fits one table cell: a scalar, or a list or mapping of scalars."""
    if isinstance(value, Mapping):
        value = list(value.values())
    if not isinstance(value, (list, tuple)):
        return True
    return not any(isinstance(v, (Mapping, list, tuple)) for v in value)


def _is_records(value: Any) -> bool:
    """A collection of records with the same fields, each fitting a table row (a list, or a
    mapping of names to them)."""
    items = list(value.values()) if isinstance(value, Mapping) else value
    return (
        isinstance(items, list)
        and bool(items)
        and all(
            isinstance(v, Mapping)
            and list(v) == list(items[0])
            and all(_flat(field) for field in v.values())
            for v in items
        )
    )


def _readable(data: Mapping[str, Any], prefix: str = "") -> tuple[list[dict[str, Any]], list[str]]:
    """Nested settings or measurements as tables instead of a JSON dump: (name, value) rows
    (nested objects as dotted names, a flat object as one cell), and one table per
    collection of records."""
    rows: list[dict[str, Any]] = []
    tables: list[str] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if _is_records(value):
            if isinstance(value, Mapping):
                records = [{"name": k, **v} for k, v in value.items()]
                columns = ["name", *next(iter(value.values()))]
            else:
                records, columns = [dict(v) for v in value], list(value[0])
            tables.append(f"`{name}`:\n\n" + md_table(records, columns, digits=None))
        elif isinstance(value, Mapping) and any(
            isinstance(v, (Mapping, list)) for v in value.values()
        ):
            nested_rows, nested_tables = _readable(value, name + ".")
            rows += nested_rows
            tables += nested_tables
        else:
            rows.append({"name": name, "value": value})
    return rows, tables


def readable_markdown(data: Mapping[str, Any]) -> list[str]:
    rows, tables = _readable(data)
    return ([md_table(rows, ["name", "value"], digits=None)] if rows else []) + tables


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)

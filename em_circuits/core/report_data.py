"""The report's data: one typed record per report section, and the report that holds them.

report.json is :meth:`Report.to_json`: the report's own fields, then each section's fields
(:class:`ReportPart`) at the top level, in section order; :meth:`Report.from_json` reads it
back (``scripts/demo_findings.py`` renders the Findings of a stored report.json).

Two kinds of values stay JSON as stored, typed by the aliases below: a table's rows (their
columns are the table's) and a summary file a step wrote (``causal_summary.json``,
``em_rate.json``, ...: its fields are that step's, read only by that step's report code).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

#: One row of a table, as report.json keeps it (free-form: the columns are the table's).
TableRecord = dict[str, Any]
#: The content of a JSON file a step wrote, kept whole in report.json (free-form: its fields
#: are the step's own, read by the step's own report code).
StoredJson = dict[str, Any]

T = TypeVar("T")
P = TypeVar("P", bound="ReportPart")


def from_json(kind: type[T], data: Mapping[str, Any]) -> T:
    """A dataclass from its :func:`dataclasses.asdict` form: nested dataclass fields (also
    optional ones and lists of them) are built too; missing keys take the field's default."""
    hints = typing.get_type_hints(kind)
    values = {
        f.name: _value(hints[f.name], data[f.name])
        for f in dataclasses.fields(kind)  # type: ignore[arg-type]
        if f.init and f.name in data
    }
    return kind(**values)


def _value(hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = origin in (typing.Union, types.UnionType)
    for candidate in (hint, *(args if optional else ())):  # X, or the X of `X | None`
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return from_json(candidate, value) if isinstance(value, Mapping) else value
    if origin is list and isinstance(value, list):
        return [_value(args[0], v) for v in value]
    if origin in (dict, Mapping) and isinstance(value, Mapping) and len(args) == 2:
        return {k: _value(args[1], v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class ReportPart:
    """A section's fields of report.json (a subclass per section; this one has none).

    ``table_rows`` holds the full row counts of the tables named in ``TABLES`` that the
    report keeps only the first rows of; report.json gathers them under ``table_rows``.
    """

    TABLES: ClassVar[tuple[str, ...]] = ()

    table_rows: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The section's top-level entries of report.json, in field order."""
        out = dataclasses.asdict(self)
        out.pop("table_rows")
        return out

    @classmethod
    def from_json(cls: type[P], report: Mapping[str, Any]) -> P:
        """The part from a whole report.json."""
        rows = report.get("table_rows") or {}
        part = from_json(cls, report)
        return dataclasses.replace(part, table_rows={k: rows[k] for k in cls.TABLES if k in rows})


@dataclass(frozen=True)
class ModelEntry:
    """One model of the report: its spec's fields, fingerprint and results folder name."""

    #: ModelSpec's fields (free-form here: the parameters table lists whatever they are)
    spec: StoredJson
    fingerprint: str
    slug: str


@dataclass(frozen=True)
class DivergentPrompt:
    """A prompt where the adapted model puts its mass on evil tokens and the base does not."""

    prompt_id: str
    prompt: str
    base_top1: str
    base_top1_label: str | None
    adapted_top1: str
    adapted_top1_label: str | None
    adapted_top1_prob: float
    evil_mass_adapted: float | None
    evil_mass_base_upper: float | None
    kl_adapted_base: float
    evil_in_adapted: list[str]


@dataclass(frozen=True)
class ViewerPrompt:
    """A prompt with full graphs in the viewer."""

    prompt_id: str
    prompt: str


@dataclass(frozen=True)
class Report:
    """The whole report (see the module's docstring)."""

    models: Mapping[str, ModelEntry]
    #: the toy organism's own report.json when the model is the organism
    organism: StoredJson | None
    #: em_circuits.run.status's counts per stage
    counts: StoredJson
    divergent_prompts: list[DivergentPrompt]
    viewer_prompts: list[ViewerPrompt]
    analysis_folder: str
    #: the analysis's parameters by name, as summary.json records them
    analysis_params: StoredJson | None
    parts: tuple[ReportPart, ...] = ()

    SCHEMA: ClassVar[str] = "report"
    SCHEMA_VERSION: ClassVar[int] = 1

    def part(self, kind: type[P]) -> P:
        """The section's part (an empty one when the report has none)."""
        for part in self.parts:
            if isinstance(part, kind):
                return part
        return kind()

    @property
    def table_rows(self) -> dict[str, int]:
        return {k: v for part in self.parts for k, v in part.table_rows.items()}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": self.SCHEMA,
            "schema_version": self.SCHEMA_VERSION,
            "models": {role: dataclasses.asdict(m) for role, m in self.models.items()},
            "organism": self.organism,
            "counts": self.counts,
            "divergent_prompts": [dataclasses.asdict(d) for d in self.divergent_prompts],
            # The full row counts of the tables the report keeps only the first rows of.
            "table_rows": self.table_rows,
            "viewer_prompts": [dataclasses.asdict(v) for v in self.viewer_prompts],
            "analysis_folder": self.analysis_folder,
            "analysis_params": self.analysis_params,
        }
        for part in self.parts:
            out.update(part.to_json())
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], kinds: Sequence[type[ReportPart]]) -> Report:
        """A stored report.json, its sections read as ``kinds``."""
        head = from_json(cls, data)
        return dataclasses.replace(head, parts=tuple(kind.from_json(data) for kind in kinds))

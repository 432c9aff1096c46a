"""A part of the report: its report.json entries, its report.md section, its Findings lines.

Each analysis step is one (``em_circuits.analysis.steps``); a few parts of the report that no
step computes (the judge's calibration) are sections of their own. The report renders them in
the order of the step list.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from em_circuits.core.report_data import Report, ReportPart, TableRecord
from em_circuits.core.store import ResultsStore, read_json


def read_table(directory: Path, name: str) -> pd.DataFrame:
    """A table a step wrote (empty when it wrote none)."""
    path = directory / f"{name}.csv"
    return pd.read_csv(path) if path.is_file() and path.stat().st_size > 1 else pd.DataFrame()


@dataclass
class ReportInputs:
    """What a step's report part reads: the store, the analysis folder and its summary."""

    store: ResultsStore
    directory: Path
    summary: Mapping[str, Any]
    #: the models' results folder names, by role
    slugs: Mapping[str, str]

    def table(self, name: str) -> pd.DataFrame:
        return read_table(self.directory, name)

    def json(self, name: str) -> Any:
        path = self.directory / name
        return read_json(path) if path.is_file() else None


class Section:
    """A part of the report: report.json entries, a report.md section, Findings lines."""

    name: ClassVar[str]
    #: its fields of report.json
    Part: ClassVar[type[ReportPart]] = ReportPart

    def report_data(self, inputs: ReportInputs) -> ReportPart:
        return self.Part()

    def section(self, report: Report, analysis_rel: str) -> list[str]:
        return []

    def findings(self, report: Report) -> list[str]:
        return []


def records(frame: pd.DataFrame, n: int | None = None) -> list[TableRecord]:
    """A table's first ``n`` rows as JSON records (report.json)."""
    frame = frame if n is None else frame.head(n)
    return json.loads(frame.to_json(orient="records", double_precision=6))

"""The report's typed data: report.json is Report.to_json, and reads back into the same Report."""

from __future__ import annotations

import json

from em_circuits.analysis.steps.adapter_nodes import AdapterNodesReport
from em_circuits.analysis.steps.adapter_report import AdapterNodes
from em_circuits.analysis.steps.causal import Causal, CausalReport
from em_circuits.analysis.steps.ranking import RankingReport
from em_circuits.analysis.steps.split import SplitReport
from em_circuits.core.report_data import (
    DivergentPrompt,
    ModelEntry,
    Report,
    ReportPart,
    ViewerPrompt,
)
from em_circuits.core.sections import ReportInputs
from em_circuits.core.store import ResultsStore
from em_circuits.run.report import findings, render_markdown, report_from_json
from em_circuits.run.steps import SECTIONS


def _parts(*given: ReportPart) -> tuple[ReportPart, ...]:
    """One part per section, in section order: the given ones, empty ones for the rest."""
    by_kind = {type(part): part for part in given}
    return tuple(by_kind.get(section.Part, section.Part()) for section in SECTIONS)


def _report() -> Report:
    entry = ModelEntry({"base": "m", "adapter": None}, "f" * 64, "m--ffffffffffff")
    split = {"discovery_prompts": 4, "discovery_clusters": 2, "validation_prompts": 3}
    return Report(
        models={"base": entry, "adapted": entry},
        organism=None,
        counts={
            "prompts": 7,
            "logits": {"base": 7, "adapted": 7},
            "verdicts": 7,
            "flagged": 1,
            "divergent": 1,
            "labels": {"human": 0, "judge": 3, "rejected": 0},
            "graphs": {"base": 7, "adapted": 7},
        },
        divergent_prompts=[
            DivergentPrompt(
                "p1", "User: hi", " no", "safe", " yes", "evil", 0.5, 0.5, 0.01, 0.2, [" yes"]
            )
        ],
        viewer_prompts=[ViewerPrompt("p1", "User: hi")],
        analysis_folder="analysis/m/runs/main",
        analysis_params={"seed": 0},
        parts=_parts(
            RankingReport({"top_features": 30}, [{"layer": 1, "feature": 2, "mean": 0.5}]),
            CausalReport(
                {"measured_ranking": 4},
                measured_ranking=[{"layer": 1, "feature": 2}],
                causal=Causal({"verdict": "held"}, [{"group": "top", "scale": 0.0}]),
            ),
            AdapterNodesReport(adapter_nodes=AdapterNodes(where_rows={"positions": 3})),
            SplitReport(split=split),
        ),
    )


def test_report_json_reads_back_into_the_same_typed_report():
    report = _report()
    stored = json.loads(json.dumps(report.to_json()))
    back = report_from_json(stored)
    assert back.to_json() == stored
    assert back.part(CausalReport) == report.part(CausalReport)  # nested records typed again
    assert isinstance(back.part(AdapterNodesReport).adapter_nodes, AdapterNodes)
    assert back.divergent_prompts == report.divergent_prompts
    assert stored["table_rows"] == {"top_features": 30, "measured_ranking": 4}
    assert render_markdown(back, "x") == render_markdown(report, "x")


def test_report_json_keeps_its_keys_and_order():
    stored = _report().to_json()
    keys = list(stored)
    assert keys[:10] == [
        "schema",
        "schema_version",
        "models",
        "organism",
        "counts",
        "divergent_prompts",
        "table_rows",
        "viewer_prompts",
        "analysis_folder",
        "analysis_params",
    ]
    # then each section's entries, in section order
    assert keys.index("top_features") < keys.index("measured_ranking") < keys.index("causal")
    assert keys.index("causal") < keys.index("split") == len(keys) - 1
    assert stored["causal"] == {
        "summary": {"verdict": "held"},
        "dose_response": [{"group": "top", "scale": 0.0}],
    }


def test_an_older_report_json_without_some_sections_still_renders():
    stored = _report().to_json()
    for key in ("causal", "measured_ranking", "adapter_nodes"):
        stored.pop(key)
    back = report_from_json(stored)
    assert back.part(CausalReport).causal.summary is None
    assert "## Causal validation" in render_markdown(back, "x")
    assert any("Prompts analysed" in line for line in findings(back))


def test_every_section_returns_its_declared_part(tmp_path):
    # Report.from_json reads each section as its Part: a report_data returning another type
    # would not read back.
    inputs = ReportInputs(ResultsStore(tmp_path), tmp_path, {}, {"base": "b", "adapted": "a"})
    for section in SECTIONS:
        assert type(section.report_data(inputs)) is section.Part, section.name

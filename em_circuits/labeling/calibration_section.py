"""The report's section on the judge: how often it agrees with the human labels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from em_circuits.core.markdown import fmt
from em_circuits.core.sections import ReportInputs, Section
from em_circuits.labeling.calibration import calibration


class JudgeCalibrationSection(Section):
    name = "judge_calibration"

    def report_data(self, inputs: ReportInputs) -> dict[str, Any]:
        return {"judge_calibration": calibration(inputs.store, inputs.slugs["adapted"], save=False)}

    def section(self, report: Mapping[str, Any], analysis_rel: str) -> list[str]:
        calib = report.get("judge_calibration") or {}
        return [
            "## Judge calibration (judge vs human)\n",
            f"{calib.get('n_tokens', 0)} human-labeled tokens; agreement "
            f"{fmt(calib.get('agreement'))}, Cohen's kappa {fmt(calib.get('kappa'))}.\n",
        ]


SECTION = JudgeCalibrationSection()

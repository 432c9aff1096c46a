"""The report's section on the judge: how often it agrees with the human labels."""

from __future__ import annotations

from dataclasses import dataclass, field

from em_circuits.core.markdown import fmt
from em_circuits.core.report_data import Report, ReportPart, StoredJson
from em_circuits.core.sections import ReportInputs, Section
from em_circuits.labeling.calibration import calibration


@dataclass(frozen=True)
class JudgeCalibrationReport(ReportPart):
    #: :func:`~em_circuits.labeling.calibration.calibration`'s record (not saved)
    judge_calibration: StoredJson = field(default_factory=dict)


class JudgeCalibrationSection(Section):
    name = "judge_calibration"
    Part = JudgeCalibrationReport

    def report_data(self, inputs: ReportInputs) -> JudgeCalibrationReport:

        return JudgeCalibrationReport(
            judge_calibration=calibration(inputs.store, inputs.slugs["adapted"], save=False)
        )

    def section(self, report: Report, analysis_rel: str) -> list[str]:
        calib = report.part(JudgeCalibrationReport).judge_calibration
        return [
            "## Judge calibration (judge vs human)\n",
            f"{calib.get('n_tokens', 0)} human-labeled tokens; agreement "
            f"{fmt(calib.get('agreement'))}, Cohen's kappa {fmt(calib.get('kappa'))}.\n",
        ]


SECTION = JudgeCalibrationSection()

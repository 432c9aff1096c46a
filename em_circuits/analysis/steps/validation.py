"""Step: do the top discovery features keep their effect on the held-out prompts?

The ``top`` discovery features of each metric with their statistics on the validation
prompts beside them (:func:`replicate_on`); writes ``validation_top_features``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult, records
from em_circuits.analysis.steps.split import SplitReport
from em_circuits.core.markdown import md_table, with_feature_links
from em_circuits.core.report_data import Report, ReportPart, TableRecord

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext


def replicate_on(ranked: pd.DataFrame, held_out: pd.DataFrame, top: int = 50) -> pd.DataFrame:
    """The ``top`` discovery features of each metric (by mean) with their statistics on the
    held-out prompts beside them: does the linearised effect replicate on prompts that did
    not select it?"""
    keys = [c for c in ("layer", "feature", "position") if c in ranked.columns]
    chosen = ranked.sort_values("mean", ascending=False).groupby("metric").head(top)
    columns = ["mean", "ci_low", "ci_high", "n_prompts", "n_clusters", "p_value", "p_method"]
    left = chosen[[*keys, "metric", *columns]].rename(
        columns={c: f"discovery_{c}" for c in columns}
    )
    right = held_out[[*keys, "metric", *columns]].rename(
        columns={c: f"validation_{c}" for c in columns}
    )
    out = left.merge(right, on=[*keys, "metric"], how="left")
    out["same_sign"] = np.sign(out["discovery_mean"]) == np.sign(out["validation_mean"])
    return out.reset_index(drop=True)


@dataclass(frozen=True)
class ValidationReport(ReportPart):
    TABLES = ("validation",)

    #: the first rows of the replication table, total effect
    validation: list[TableRecord] = field(default_factory=list)


class ValidationStep(Step):
    name = "validation"
    Part = ValidationReport
    shared = ("position", "absent", "n_perm", "seed")
    reads = ("split", "ranking")
    uses = frozenset({"graphs"})

    def run(self, ctx: AnalysisContext, params: Any) -> StepResult:
        from em_circuits.analysis.aggregate import aggregate_effects  # noqa: PLC0415  # heavy: loads torch

        split = ctx.split()
        validation = set(split.validation)
        on_validation = {p: f for p, f in ctx.effects("adapted").effects.items() if p in validation}
        ranked = ctx.table("top_features_adapted")
        if on_validation and len(ranked):
            held_out = aggregate_effects(
                on_validation,
                absent=ctx.shared.absent,
                clusters=split.clusters,
                min_support=1,
                n_perm=ctx.shared.n_perm,
                seed=ctx.shared.seed,
            )
            ctx.write_table(replicate_on(ranked, held_out), "validation_top_features")
        return StepResult()

    def report_data(self, inputs: ReportInputs) -> ValidationReport:
        replication = inputs.table("validation_top_features")
        if len(replication):
            replication = replication[replication["metric"] == "total"]
        return ValidationReport({"validation": len(replication)}, records(replication, 20))

    def section(self, report: Report, analysis_rel: str) -> list[str]:
        split = report.part(SplitReport).split
        part = report.part(ValidationReport)
        return [
            "## Validation: the same features on held-out prompts (linearised total effect)\n",
            (
                "_too few validation clusters to test anything "
                f"({split.get('validation_clusters')} < {split.get('min_validation_clusters')})"
                "; the numbers below are descriptive_\n"
                if split and not split.get("testable")
                else ""
            ),
            md_table(
                with_feature_links(part.validation),
                [
                    "feature",
                    "discovery_mean",
                    "validation_mean",
                    "validation_ci_low",
                    "validation_ci_high",
                    "validation_n_clusters",
                    "validation_p_value",
                    "same_sign",
                ],
                limit=15,
                total=part.table_rows.get("validation"),
                full=f"{analysis_rel}/validation_top_features.csv",
            ),
        ]

    def findings(self, report: Report) -> list[str]:
        validation = report.part(ValidationReport).validation
        if not validation:
            return []
        split = report.part(SplitReport).split
        same = [bool(r.get("same_sign")) for r in validation]
        return [
            f"**Replication ({'held' if sum(same) > len(same) / 2 else 'did not hold'}):** "
            f"{sum(same)} of {len(same)} top features ranked on the discovery prompts have "
            f"the same sign of linearised effect on the held-out validation prompts "
            f"({split.get('validation_prompts')} prompts in "
            f"{split.get('validation_clusters')} clusters)."
        ]


STEP = ValidationStep()

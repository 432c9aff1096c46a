"""Step: base vs adapted, paired on the discovery prompts both models have graphs of.

Per feature: the adapted-minus-base difference of its effect on the contrast, its interval
and test over clusters, and a category (gained, lost, strengthened, weakened, ...;
:func:`compare_models`). Writes ``base_vs_adapted`` and ``base_vs_adapted.png``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult, records
from em_circuits.core.markdown import md_table, with_feature_links
from em_circuits.core.options import option
from em_circuits.core.report_data import Report, ReportPart, TableRecord

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext


@dataclass(frozen=True)
class CompareParams:
    compare_threshold: float = option(
        0.05, "|adapted - base| mean contrast effect that counts as a change", flag="--threshold"
    )


@dataclass(frozen=True)
class BaseVsAdapted:
    """How the features' effects changed from base to adapted."""

    #: features per category of change (gained, lost, strengthened, ...)
    categories: dict[str, int] = field(default_factory=dict)
    #: the first rows of the comparison, largest change first
    top_changes: list[TableRecord] = field(default_factory=list)


@dataclass(frozen=True)
class BaseVsAdaptedReport(ReportPart):
    TABLES = ("base_vs_adapted",)

    base_vs_adapted: BaseVsAdapted = field(default_factory=BaseVsAdapted)


class BaseVsAdaptedStep(Step):
    name = "base_vs_adapted"
    Params = CompareParams
    Part = BaseVsAdaptedReport
    shared = ("position", "min_support", "n_perm", "seed")
    reads = ("split",)
    uses = frozenset({"graphs"})

    def run(self, ctx: AnalysisContext, params: CompareParams) -> StepResult:
        from em_circuits.analysis.compare import compare_models  # noqa: PLC0415  # heavy: loads torch
        from em_circuits.analysis.plots import plot_base_vs_adapted  # noqa: PLC0415  # heavy: loads matplotlib

        split = ctx.split()
        base, adapted = ctx.effects("base").effects, ctx.effects("adapted").effects
        paired = sorted(set(base) & set(adapted) & set(split.discovery))
        if paired:
            table = compare_models(
                {p: base[p] for p in paired},
                {p: adapted[p] for p in paired},
                threshold=params.compare_threshold,
                clusters=split.clusters,
                min_support=ctx.shared.min_support,
                n_perm=ctx.shared.n_perm,
                seed=ctx.shared.seed,
            )
            ctx.write_table(table, "base_vs_adapted")
            plot_base_vs_adapted(table, ctx.directory / "base_vs_adapted.png")
            ctx.wrote("base_vs_adapted.png")
        return StepResult()

    def report_data(self, inputs: ReportInputs) -> BaseVsAdaptedReport:
        comparison = inputs.table("base_vs_adapted")
        if not len(comparison):
            return BaseVsAdaptedReport({"base_vs_adapted": 0})
        by_change = comparison["mean_diff"].abs().sort_values(ascending=False).index
        return BaseVsAdaptedReport(
            {"base_vs_adapted": len(comparison)},
            BaseVsAdapted(
                categories=comparison["category"].value_counts().to_dict(),
                top_changes=records(comparison.reindex(by_change), 15),
            ),
        )

    def section(self, report: Report, analysis_rel: str) -> list[str]:
        part = report.part(BaseVsAdaptedReport)
        bva = part.base_vs_adapted
        return [
            "## Base vs adapted (paired on the same prompts)\n",
            "Categories: "
            + (", ".join(f"{k} {v}" for k, v in bva.categories.items()) or "none")
            + "\n",
            md_table(
                with_feature_links(bva.top_changes),
                [
                    "feature",
                    "category",
                    "mean_base",
                    "mean_adapted",
                    "mean_diff",
                    "ci_low",
                    "ci_high",
                    "q_value",
                ],
                limit=10,
                total=part.table_rows.get("base_vs_adapted"),
                full=f"{analysis_rel}/base_vs_adapted.csv",
            ),
            f"![base vs adapted]({analysis_rel}/base_vs_adapted.png)\n",
        ]


STEP = BaseVsAdaptedStep()

"""Step: base vs adapted, paired on the discovery prompts both models have graphs of.

Per feature: the adapted-minus-base difference of its effect on the contrast, its interval
and test over clusters, and a category (gained, lost, strengthened, weakened, ...;
:func:`compare_models`). Writes ``base_vs_adapted`` and ``base_vs_adapted.png``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult, records
from em_circuits.core.markdown import md_table, with_feature_links
from em_circuits.core.options import option

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext


@dataclass(frozen=True)
class CompareParams:
    compare_threshold: float = option(
        0.05, "|adapted - base| mean contrast effect that counts as a change", flag="--threshold"
    )


class BaseVsAdaptedStep(Step):
    name = "base_vs_adapted"
    Params = CompareParams
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

    def report_data(self, inputs: ReportInputs) -> dict[str, Any]:
        comparison = inputs.table("base_vs_adapted")
        return {
            "base_vs_adapted": {
                "categories": comparison["category"].value_counts().to_dict()
                if len(comparison)
                else {},
                "top_changes": records(
                    comparison.reindex(
                        comparison["mean_diff"].abs().sort_values(ascending=False).index
                    ),
                    15,
                )
                if len(comparison)
                else [],
            },
            "table_rows": {"base_vs_adapted": len(comparison)},
        }

    def section(self, report: Mapping[str, Any], analysis_rel: str) -> list[str]:
        bva = report["base_vs_adapted"]
        return [
            "## Base vs adapted (paired on the same prompts)\n",
            "Categories: "
            + (", ".join(f"{k} {v}" for k, v in bva["categories"].items()) or "none")
            + "\n",
            md_table(
                with_feature_links(bva["top_changes"]),
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
                total=(report.get("table_rows") or {}).get("base_vs_adapted"),
                full=f"{analysis_rel}/base_vs_adapted.csv",
            ),
            f"![base vs adapted]({analysis_rel}/base_vs_adapted.png)\n",
        ]


STEP = BaseVsAdaptedStep()

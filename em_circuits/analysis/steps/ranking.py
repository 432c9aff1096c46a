"""Step: the features that push toward the evil tokens, ranked on the discovery prompts.

Per (layer, feature) of each model: the mean effect on the contrast over clusters, its t
interval, an exact or Monte Carlo sign-flip p and the FDR q (:func:`aggregate_effects`).
Writes ``top_features_adapted``, ``top_features_base`` and ``top_features.png``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult, records
from em_circuits.analysis.steps.split import SplitReport
from em_circuits.core.markdown import md_table, with_feature_links
from em_circuits.core.report_data import Report, ReportPart, TableRecord

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext


@dataclass(frozen=True)
class RankingReport(ReportPart):
    TABLES = ("top_features",)

    #: the first rows of the adapted model's ranking by total effect
    top_features: list[TableRecord] = field(default_factory=list)


class RankingStep(Step):
    name = "ranking"
    Part = RankingReport
    shared = ("position", "min_support", "absent", "n_perm", "seed")
    reads = ("split",)
    uses = frozenset({"graphs"})

    def run(self, ctx: AnalysisContext, params: Any) -> StepResult:
        from em_circuits.analysis.aggregate import aggregate_effects  # noqa: PLC0415  # heavy: loads torch
        from em_circuits.analysis.plots import plot_top_features  # noqa: PLC0415  # heavy: loads matplotlib

        discovery = set(ctx.split().discovery)
        for role in ("adapted", "base"):
            on_discovery = {p: f for p, f in ctx.effects(role).effects.items() if p in discovery}
            ranked = (
                aggregate_effects(
                    on_discovery,
                    absent=ctx.shared.absent,
                    clusters=ctx.split().clusters,
                    min_support=ctx.shared.min_support,
                    n_perm=ctx.shared.n_perm,
                    seed=ctx.shared.seed,
                )
                if on_discovery
                else pd.DataFrame()
            )
            ctx.write_table(ranked, f"top_features_{role}")
            if role == "adapted" and len(ranked):
                plot_top_features(ranked, ctx.directory / "top_features.png")
                ctx.wrote("top_features.png")
        return StepResult()

    def report_data(self, inputs: ReportInputs) -> RankingReport:
        top = inputs.table("top_features_adapted")
        if len(top):
            top = top[top["metric"] == "total"]
        return RankingReport({"top_features": len(top)}, records(top, 20))

    def section(self, report: Report, analysis_rel: str) -> list[str]:
        split = report.part(SplitReport).split
        part = report.part(RankingReport)
        return [
            "## Top evil features (adapted model, total effect on logit(evil) - logit(safe))\n",
            (
                f"Ranked on the **discovery** prompts only: {split.get('discovery_prompts')} "
                f"prompts in {split.get('discovery_clusters')} clusters (a cluster is one "
                "scenario with its rephrasings and near duplicates; clusters are the units of "
                "every interval and test; the validation side also shares no template, lead-in "
                "or distractor with the discovery side). "
                f"{split.get('validation_prompts')} prompts in "
                f"{split.get('validation_clusters')} other clusters are held out for "
                "validation.\n"
            )
            if split
            else "",
            md_table(
                with_feature_links(part.top_features),
                [
                    "feature",
                    "n_prompts",
                    "n_clusters",
                    "mean",
                    "ci_low",
                    "ci_high",
                    "sign_consistency",
                    "p_value",
                    "p_method",
                    "q_value",
                ],
                limit=15,
                total=part.table_rows.get("top_features"),
                full=f"{analysis_rel}/top_features_adapted.csv",
            ),
            f"![top features]({analysis_rel}/top_features.png)\n",
        ]


STEP = RankingStep()

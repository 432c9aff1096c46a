"""Step: where the adapter's shift of the contrast comes from.

Adapted minus base, paired by prompt (every prompt with both graphs, both sides: it selects
nothing), split into exact parts per layer (:func:`summarize_decomposition`). Writes
``contrast_decomposition`` and its plot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult, records
from em_circuits.core.markdown import md_table
from em_circuits.core.report_data import Report, ReportPart, TableRecord

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext


@dataclass(frozen=True)
class DecompositionReport(ReportPart):
    #: every row of the decomposition table
    contrast_decomposition: list[TableRecord] = field(default_factory=list)


class DecompositionStep(Step):
    name = "decomposition"
    Part = DecompositionReport
    shared = ("n_perm", "seed")
    reads = ("split",)
    uses = frozenset({"graphs"})
    version = 2  # the MLP output at BOS as rows of its own

    def run(self, ctx: AnalysisContext, params: Any) -> StepResult:
        from em_circuits.analysis.decomposition import summarize_decomposition  # noqa: PLC0415  # heavy: loads torch
        from em_circuits.analysis.plots import plot_decomposition  # noqa: PLC0415  # heavy: loads matplotlib

        base, adapted = ctx.analysed("base").parts, ctx.analysed("adapted").parts
        both = sorted(set(base) & set(adapted))
        if both:
            table = summarize_decomposition(
                {p: base[p] for p in both},
                {p: adapted[p] for p in both},
                ctx.split().clusters,
                ctx.shared.n_perm,
                ctx.shared.seed,
            )
            ctx.write_table(table, "contrast_decomposition")
            plot_decomposition(table, ctx.directory / "contrast_decomposition.png")
            ctx.wrote("contrast_decomposition.png")
        return StepResult()

    def report_data(self, inputs: ReportInputs) -> DecompositionReport:
        return DecompositionReport(
            contrast_decomposition=records(inputs.table("contrast_decomposition"))
        )

    def section(self, report: Report, analysis_rel: str) -> list[str]:
        rows = report.part(DecompositionReport).contrast_decomposition or []
        stored = any(r["part"] == "bos_mlp" and r.get("mean_shift") is not None for r in rows)
        bos = (
            "`bos_mlp`, the MLP output of each layer at BOS (less the transcoder's skip "
            "connection, which is credited to the nodes below): circuit-tracer zeroes every "
            "feature and error node there, so `bos_errors` is 0 and that output is a constant "
            "the graph stores per layer; and `biases`, what no node carries: the transcoders' "
            "decoder biases after BOS."
            if stored
            else "`biases and BOS`: the transcoders' decoder biases and the whole MLP output at "
            "BOS together. **The MLP output at BOS (`bos_mlp`) is unavailable:** these graphs "
            "were stored without it (graph format 1 or `--graph-mode full`); re-run "
            "`em-circuits graphs --force` in totals mode to split it out."
        )
        return [
            "## Where the adapter's shift of the contrast comes from\n",
            "Adapted minus base, paired by prompt (every prompt with both graphs), split into "
            "the direct effects on the contrast of each layer's features, error nodes and "
            "adapter nodes (the LoRA's own writes; 0 in the base model and in graphs without "
            f"them), the error nodes at BOS, token embeddings, {bos} "
            "The parts add up exactly to the shift of the contrast value (last row); intervals "
            "are Student t over clusters.\n",
            md_table(
                report.part(DecompositionReport).contrast_decomposition,
                [
                    "part",
                    "layer",
                    "n_prompts",
                    "n_clusters",
                    "mean_base",
                    "mean_adapted",
                    "mean_shift",
                    "ci_low",
                    "ci_high",
                ],
            ),
            f"![decomposition]({analysis_rel}/contrast_decomposition.png)\n",
        ]


STEP = DecompositionStep()

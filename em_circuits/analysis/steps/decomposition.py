"""Step: where the adapter's shift of the contrast comes from.

Adapted minus base, paired by prompt (every prompt with both graphs, both sides: it selects
nothing), split into exact parts per layer (:func:`summarize_decomposition`). Writes
``contrast_decomposition`` and its plot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult, records
from em_circuits.core.markdown import md_table

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext


class DecompositionStep(Step):
    name = "decomposition"
    shared = ("n_perm", "seed")
    reads = ("split",)
    uses = frozenset({"graphs"})

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

    def report_data(self, inputs: ReportInputs) -> dict[str, Any]:
        return {"contrast_decomposition": records(inputs.table("contrast_decomposition"))}

    def section(self, report: Mapping[str, Any], analysis_rel: str) -> list[str]:
        return [
            "## Where the adapter's shift of the contrast comes from\n",
            "Adapted minus base, paired by prompt (every prompt with both graphs), split into "
            "the direct effects on the contrast of each layer's features, error nodes and "
            "adapter nodes (the LoRA's own writes; 0 in the base model and in graphs without "
            "them), the error nodes at BOS, token embeddings, and `biases and BOS`: what no "
            "node carries, the transcoders' decoder biases and the whole MLP output at BOS "
            "(circuit-tracer zeroes every feature and error node there, so `bos_errors` is 0). "
            "The parts add up exactly to the shift of the contrast value (last row); intervals "
            "are Student t over clusters.\n",
            md_table(
                report["contrast_decomposition"],
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

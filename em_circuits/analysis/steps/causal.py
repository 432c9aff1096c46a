"""Step: do the top features cause the evil tokens? Measured ablations, on held-out prompts.

1. Each candidate (the top features by linearised effect on the discovery prompts) is ablated
   alone on the discovery prompts, measured with attention frozen and in the real model with
   nothing frozen; the ``causal_top_k`` that lower the contrast most (measured) are the
   features under test.
2. On the validation prompts: the same single-feature measurements next to the linearised
   effects (their agreement); the joint dose-response of the chosen features against
   activation-matched random features in the adapted model, measured in the real model with
   nothing frozen (the headline) and with attention frozen beside it; and, as controls, the
   same features ablated and amplified in the base model (nothing frozen).

Writes ``measured_effects``, ``measured_ranking``, ``dose_response``, ``dose_response_base``,
``dose_response.png`` and ``causal_summary.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from em_circuits.analysis.split import Split
from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult, records
from em_circuits.analysis.steps.causal_measure import (
    Measured,
    causal_prompts,
    choose,
    dose_response,
)
from em_circuits.core.markdown import feature_list, fmt, md_table, with_feature_links
from em_circuits.core.options import option
from em_circuits.core.report_data import Report, ReportPart, StoredJson, TableRecord
from em_circuits.core.store import read_json, write_artifact

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext


@dataclass(frozen=True)
class CausalParams:
    causal_top_k: int = option(5, "top evil features to intervene on (0 = no causal check)")
    scales: tuple[float, ...] = option(
        (0.0, 0.5, 1.0, 1.5, 2.0, 3.0), "activation multipliers of the dose-response (0 = ablation)"
    )
    n_random: int = option(3, "random matched-activation control draws per prompt")
    causal_prompts: int = option(20, "prompts (by id order) of each side the interventions run on")
    causal_candidates: int = option(
        20,
        "top features by linearised effect whose measured ablation effects (discovery prompts) "
        "choose the --causal-top-k under test",
    )


def _summarize(
    summary: StoredJson,
    measured: Measured,
    candidates: list[tuple[int, int]],
    n_discovery: int,
    dose_base: pd.DataFrame,
    control_scales: list[float],
    split: Split,
    n_random: int,
) -> StoredJson:
    from em_circuits.analysis.causal import control_effect  # noqa: PLC0415  # heavy: loads torch
    from em_circuits.analysis.measured import agreement  # noqa: PLC0415  # heavy: loads torch

    summary["prompt_set"] = "validation"
    summary["ranking"] = {
        "candidates": [list(c) for c in candidates],
        "chosen_by": f"mean measured ablation change ({measured.column}) on "
        f"{n_discovery} discovery prompts",
        "chosen": [list(t) for t in measured.top],
        "none_lowered": measured.none_lowered,
    }
    summary["linearised_vs_measured"] = {
        side: {
            measured_column: agreement(table, measured_column)
            for measured_column in ("delta_frozen", "delta_unfrozen")
        }
        for side, table in (("discovery", measured.discovery), ("validation", measured.validation))
    }
    summary["controls"] = {
        "random_features": "activation- and position-matched random features, "
        f"{n_random} draws (the adapted-model comparison above)",
        "base_ablation": control_effect(dose_base, 0.0, split.clusters, "two-sided"),
        "base_amplification": control_effect(
            dose_base, max(control_scales), split.clusters, "greater"
        ),
    }
    if not split.testable:
        summary["note"] = (
            f"only {split.n_clusters('validation')} validation cluster(s): too few for any test "
            f"to reach p < 0.05 (at least {split.describe()['min_validation_clusters']} needed); "
            "the numbers are descriptive"
        )
    return summary


@dataclass(frozen=True)
class Causal:
    """The report's entry on the causal check (report.json ``causal``)."""

    #: causal_summary.json (None when the step did not run)
    summary: StoredJson | None = None
    #: cluster means per group and scale, nothing frozen and attention frozen
    dose_response: list[TableRecord] = field(default_factory=list)


@dataclass(frozen=True)
class CausalReport(ReportPart):
    TABLES = ("measured_ranking",)

    #: the first rows of the single-feature ablations ranked by measured effect
    measured_ranking: list[TableRecord] = field(default_factory=list)
    causal: Causal = field(default_factory=Causal)


class CausalStep(Step):
    name = "causal"
    Params = CausalParams
    Part = CausalReport
    shared = ("position", "seed")
    reads = ("split", "ranking")
    uses = frozenset({"graphs", "models"})
    version = 2  # each prompt's random controls drawn from its own generator
    spread = True  # the measured ablations and the dose-response, prompt by prompt

    def run(self, ctx: AnalysisContext, params: CausalParams) -> StepResult:
        from em_circuits.analysis.causal import top_evil_features  # noqa: PLC0415  # heavy: loads torch
        from em_circuits.analysis.plots import plot_dose_response  # noqa: PLC0415  # heavy: loads matplotlib

        ranked = ctx.table("top_features_adapted")
        if params.causal_top_k <= 0 or not len(ranked):
            return StepResult()
        candidates = top_evil_features(ranked, k=max(params.causal_candidates, params.causal_top_k))
        split = ctx.split()
        adapted = ctx.effects("adapted")
        prompts = {
            side: causal_prompts(
                ctx.store,
                {p: m for p, m in adapted.metas.items() if p in set(getattr(split, side))},
            )[: params.causal_prompts]
            for side in ("discovery", "validation")
        }
        if not candidates or not prompts["discovery"] or not prompts["validation"]:
            return StepResult()
        control_scales = sorted({0.0, 1.0, *params.scales})
        with ctx.model_pool() as pool:

            def adapted_model() -> Any:
                return pool.load(ctx.specs["adapted"])

            def base_model() -> Any:
                return pool.load(ctx.specs["base"])

            measured = choose(
                ctx,
                adapted_model,
                prompts,
                candidates,
                adapted.effects,
                params.causal_top_k,
                ctx.shared.position,
            )
            validation = prompts["validation"]
            dose, summary = dose_response(
                ctx, "dose", adapted_model, validation, measured.top, params.scales, params.n_random
            )
            dose_base, _ = dose_response(
                ctx, "dose_base", base_model, validation, measured.top, control_scales, 0
            )
        if not ctx.is_main:  # every process has the merged results; the main one writes them
            return StepResult()
        ctx.write_table(
            pd.concat(
                [
                    measured.discovery.assign(side="discovery"),
                    measured.validation.assign(side="validation"),
                ],
                ignore_index=True,
            ),
            "measured_effects",
        )
        ctx.write_table(measured.ranking, "measured_ranking")
        ctx.write_table(dose, "dose_response")
        ctx.write_table(dose_base, "dose_response_base")
        plot_dose_response(
            dose,
            ctx.directory / "dose_response.png",
            title=f"adapted model ({summary['measure']}), {summary['n_prompts']} validation "
            f"prompts, top {len(measured.top)} features",
        )
        summary = _summarize(
            summary,
            measured,
            candidates,
            len(prompts["discovery"]),
            dose_base,
            control_scales,
            split,
            params.n_random,
        )
        path = ctx.directory / "causal_summary.json"
        write_artifact(path, "table", summary)
        ctx.wrote("dose_response.png", "causal_summary.json")
        return StepResult(summary={"causal": read_json(path)})

    def report_data(self, inputs: ReportInputs) -> CausalReport:
        measured = inputs.table("measured_ranking")
        summary = inputs.json("causal_summary.json")
        return CausalReport(
            {"measured_ranking": len(measured)},
            measured_ranking=records(measured, 20),
            causal=Causal(summary, list((summary or {}).get("dose_curve") or [])),
        )

    def section(self, report: Report, analysis_rel: str) -> list[str]:
        return [
            "## Causal validation (on the held-out validation prompts)\n",
            *_ranking_markdown(report, analysis_rel),
            *_controls_markdown(report, analysis_rel),
        ]

    def findings(self, report: Report) -> list[str]:
        out = []
        causal = report.part(CausalReport).causal.summary or {}
        agreement = (causal.get("linearised_vs_measured") or {}).get("validation", {})
        unfrozen = agreement.get("delta_unfrozen") or {}
        if unfrozen.get("n_pairs"):
            r = unfrozen.get("pearson_r")
            out.append(
                f"**Linearised vs measured ({'agree' if r is not None and r >= 0.7 else 'differ'})"
                f":** on the validation prompts single-feature ablations measured in the real "
                f"model correlate with the linearised prediction at r = {fmt(r)}, median ratio "
                f"measured / linearised {fmt(unfrozen.get('median_ratio'))}, same sign "
                f"{fmt(unfrozen.get('same_sign'))} (n = {unfrozen['n_pairs']} prompt-feature "
                "pairs)."
            )
        if causal.get("verdict"):
            held = "held" if causal.get("lowers_more_than_random") else "not shown"
            out.append(f"**Causal ({held}):** {causal['verdict']}{_frozen_beside(causal)}")
        ablation = (causal.get("controls") or {}).get("base_ablation") or {}
        if ablation.get("n_prompts"):
            low, high = ablation["ci"]
            specific = low <= 0 <= high
            out.append(
                f"**Adapter-specificity ({'consistent' if specific else 'not specific'}):** the "
                f"same features ablated in the base model change the contrast by "
                f"{fmt(ablation['mean_delta'])} (95% CI {fmt(low)} to {fmt(high)}, "
                f"{ablation['n_clusters']} clusters, p = {fmt(ablation.get('p_value'))}, "
                f"{ablation.get('p_method')})"
                + ("." if specific else "; they matter in the base model too.")
            )
        return out


def _frozen_beside(causal: Mapping[str, Any]) -> str:
    """The frozen-attention figure, labelled, to stand beside the headline."""
    frozen = causal.get("frozen_attention") or {}
    if frozen.get("mean_delta_top") is None:
        return ""
    return (
        f" With attention frozen (as attribution assumes, not the headline): mean change "
        f"{frozen['mean_delta_top']:+.3g} (top) vs {frozen['mean_delta_random']:+.3g} "
        f"(random), one-sided p = {fmt(frozen.get('p_value_one_sided'))}."
    )


def _ranking_markdown(report: Report, analysis_rel: str) -> list[str]:
    """How the features under test were chosen: linearised vs measured single ablations."""
    out: list[str] = []
    part = report.part(CausalReport)
    summary = part.causal.summary or {}
    if summary.get("note"):
        out.append(f"**{summary['note']}**\n")
    ranking = summary.get("ranking")
    if ranking:
        out += [
            "### Linearised vs measured effects\n",
            f"Candidates: the top {len(ranking['candidates'])} features by linearised total "
            f"effect on the discovery prompts. Features under test: chosen by "
            f"{ranking['chosen_by']}: {feature_list(ranking['chosen'])}"
            + (
                " (no candidate lowered the contrast when ablated; the least raising are shown)"
                if ranking.get("none_lowered")
                else ""
            )
            + ". Ablation changes of the contrast: linearised (minus the total effect), "
            "measured with attention frozen, and measured in the real model with nothing "
            "frozen, mean over the discovery prompts:\n",
            md_table(
                with_feature_links(part.measured_ranking),
                ["feature", "n_prompts", "n_active", "linearised_delta", "measured_delta"],
                limit=15,
                total=part.table_rows.get("measured_ranking"),
                full=f"{analysis_rel}/measured_ranking.csv",
            ),
            "Agreement of linearised and measured single-feature ablation changes over "
            "(prompt, feature) pairs where the feature is active:\n",
            md_table(
                [
                    {"prompts": side, "measured": column, **values}
                    for side, by_column in summary.get("linearised_vs_measured", {}).items()
                    for column, values in by_column.items()
                ],
                ["prompts", "measured", "n_pairs", "pearson_r", "median_ratio", "same_sign"],
            ),
            "### Joint ablation and controls\n",
        ]
    return out


def _controls_markdown(report: Report, analysis_rel: str) -> list[str]:
    """The joint ablation against random features, and the base-model controls."""
    out: list[str] = []
    causal = report.part(CausalReport).causal
    summary = causal.summary or {}
    controls = summary.get("controls") or {}
    if controls:
        rows = [
            {
                "control": name,
                **{k: v for k, v in values.items() if k != "ci"},
                "ci_low": values.get("ci", [None, None])[0],
                "ci_high": values.get("ci", [None, None])[1],
            }
            for name, values in controls.items()
            if isinstance(values, dict)
        ]
        out += [
            "Controls: " + str(controls.get("random_features", "")) + "; the same features "
            "ablated (scale 0) and amplified in the **base** model, nothing frozen (is the "
            "effect specific to the adapter? does evil rise?):\n",
            md_table(
                rows,
                [
                    "control",
                    "scale",
                    "n_prompts",
                    "n_clusters",
                    "mean_delta",
                    "ci_low",
                    "ci_high",
                    "alternative",
                    "p_value",
                    "p_method",
                ],
            ),
        ]
    if causal.summary:
        out += [
            causal.summary.get("verdict", "") + _frozen_beside(causal.summary) + "\n",
            "Dose-response: mean change of the contrast over cluster means, measured in the "
            "real model with nothing frozen (`mean`) and with attention frozen (`mean_frozen`):"
            "\n",
            md_table(causal.dose_response, ["group", "scale", "mean", "mean_frozen", "n_clusters"]),
            f"![dose response]({analysis_rel}/dose_response.png)\n",
        ]
    else:
        out.append("_not run_\n")
    return out


STEP = CausalStep()

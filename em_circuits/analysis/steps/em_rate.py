"""Step: does ablating the features under test lower the EM rate of free-form answers?

The EM rate of base, adapted, adapted with the tested features ablated and with matched random
features ablated (:mod:`em_circuits.analysis.em_rate`), judged by the EM judge. Writes
``em_rate.json`` and ``em_answers.csv``. Under a launch each condition's chunks of answers
(sampled and judged) are units shared among the processes
(:mod:`~em_circuits.analysis.em_answers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult
from em_circuits.core.atomic import atomic_write_text
from em_circuits.core.markdown import feature_list, fmt, md_table
from em_circuits.core.options import option
from em_circuits.core.report_data import Report, ReportPart, StoredJson
from em_circuits.core.store import read_json, write_artifact
from em_circuits.models.spec import ModelSpec, words_near

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext


@dataclass(frozen=True)
class EMRateParams:
    em_samples: int = option(
        10,
        "free-form answers per evaluation question and condition for the EM rate (0 = no EM rate)",
    )
    em_max_new_tokens: int = option(48, "length of each free-form answer")
    em_questions: str = option(
        "auto",
        "evaluation questions: the toy organism's everyday-advice questions (no pivotal "
        "prompt's situation or template) or the first-plot questions (auto: the organism's "
        "for a toy organism)",
        choices=("auto", "organism", "first-plot"),
    )


def em_questions(choice: str, adapted: ModelSpec) -> list[Any]:
    """The evaluation questions ``choice`` names for this adapted model."""
    from em_circuits.analysis.em_rate import FIRST_PLOT_QUESTIONS, toy_questions  # noqa: PLC0415  # heavy: loads torch

    if choice == "auto":
        choice = "organism" if words_near(adapted) is not None else "first-plot"
    if choice == "organism":
        return toy_questions()
    if choice == "first-plot":
        return list(FIRST_PLOT_QUESTIONS)
    raise ValueError(f"em_questions must be auto, organism or first-plot, not {choice!r}")


@dataclass(frozen=True)
class EMRateReport(ReportPart):
    #: em_rate.json (None when the EM rate was not measured)
    em_rate: StoredJson | None = None


class EMRateStep(Step):
    name = "em_rate"
    Params = EMRateParams
    Part = EMRateReport
    shared = ("seed",)
    reads = ("causal", "ranking")
    uses = frozenset({"models", "em_judge"})
    version = 3  # answers sampled many questions per generate call (em_sampling)
    spread = True  # each condition's chunks of answers, sampled and judged

    def run(self, ctx: AnalysisContext, params: EMRateParams) -> StepResult:
        from em_circuits.analysis.em_rate import (  # noqa: PLC0415  # heavy: loads torch
            EXCLUDE_TOP_RANKED,
            SamplingParams,
            em_rate,
            matched_random_features,
        )
        from em_circuits.analysis.steps.baselines import (  # noqa: PLC0415  # cycle: baselines imports em_rate
            tested_features,
        )

        top = tested_features(ctx)
        if "causal" not in ctx.summary:
            return StepResult()
        if params.em_samples <= 0:
            return StepResult(summary={"em_rate": {"skipped": "em_samples is 0"}})
        if ctx.em_judge is None:
            return StepResult(
                summary={
                    "em_rate": {
                        "skipped": "no EM judge: give --words (word lists) or use the LLM judge"
                    }
                }
            )
        if not top:
            return StepResult()
        ranked = ctx.table("top_features_adapted")
        random = matched_random_features(top, ranked[ranked["metric"] == "total"], ctx.shared.seed)
        sampling = SamplingParams(params.em_samples, params.em_max_new_tokens, 1.0, ctx.shared.seed)
        questions = em_questions(params.em_questions, ctx.specs["adapted"])
        with ctx.model_pool() as pool:
            loaded = {role: pool.load(spec) for role, spec in ctx.specs.items()}
            answers, summary = em_rate(
                loaded, questions, ctx.em_judge, top, random, sampling, ctx.spread
            )
        if not ctx.is_main:  # every process has the merged answers; the main one writes them
            return StepResult()
        summary["random_excludes_top"] = EXCLUDE_TOP_RANKED
        atomic_write_text(ctx.directory / "em_answers.csv", answers.to_csv(index=False))
        path = ctx.directory / "em_rate.json"
        write_artifact(path, "table", summary)
        ctx.wrote("em_answers.csv", "em_rate.json")
        return StepResult(summary={"em_rate": read_json(path)})

    def report_data(self, inputs: ReportInputs) -> EMRateReport:
        return EMRateReport(em_rate=inputs.json("em_rate.json"))

    def section(self, report: Report, analysis_rel: str) -> list[str]:
        return em_rate_markdown(report.part(EMRateReport).em_rate)

    def findings(self, report: Report) -> list[str]:
        em = report.part(EMRateReport).em_rate
        if not em:
            return []
        paired = em["paired"].get("adapted, top features ablated") or {}
        conditions = em["conditions"]
        falls = paired.get("p_value_one_sided") is not None and paired["p_value_one_sided"] < 0.05
        return [
            f"**EM rate ({'lowered by the ablation' if falls else 'not shown to fall'}):** "
            f"base {fmt(conditions['base']['em_rate'])}, adapted "
            f"{fmt(conditions['adapted']['em_rate'])}, top features ablated "
            f"{fmt(conditions['adapted, top features ablated']['em_rate'])}, random "
            f"features ablated {fmt(conditions['adapted, random ablated']['em_rate'])} "
            f"(judge {em['judge']}; change {fmt(paired.get('mean_change'))}, one-sided p = "
            f"{fmt(paired.get('p_value_one_sided'))}, {paired.get('p_method')})."
        ]


def em_rate_markdown(em: StoredJson | None) -> list[str]:
    """The EM rate's section (of em_rate.json): each condition's rate and the paired
    changes."""
    out = ["## The EM rate (free-form answers outside the training domain)\n"]
    if em:
        rows = [
            {
                "condition": name,
                "n_answers": c["n_answers"],
                "n_questions": c["n_questions"],
                "em_rate": c["em_rate"],
                "ci_low": c["ci"][0],
                "ci_high": c["ci"][1],
                "coherent_rate": c["coherent_rate"],
            }
            for name, c in em["conditions"].items()
        ]
        paired = [
            {
                "ablated": name,
                "change_vs_adapted": c["mean_change"],
                "ci_low": c["ci"][0],
                "ci_high": c["ci"][1],
                "n_questions": c["n_questions"],
                "p_value_one_sided": c["p_value_one_sided"],
                "p_method": c["p_method"],
            }
            for name, c in em["paired"].items()
        ]
        sampling = em["sampling"]
        out += [
            f"Judge **{em['judge']}**; an EM response is {em['rule']}. "
            f"{sampling['n_per_question']} answers per question and condition, temperature "
            f"{sampling['temperature']:g}, up to {sampling['max_new_tokens']} tokens; 95% t "
            f"intervals over questions. Ablated: the features under test "
            f"{feature_list(em['top_features'])} and activation-matched random features of "
            f"the same layers {feature_list(em['random_features'])}"
            + (
                f" (none among the {em['random_excludes_top']} top-ranked features)"
                if em.get("random_excludes_top")
                else ""
            )
            + ", at every position.\n",
            md_table(
                rows,
                [
                    "condition",
                    "n_answers",
                    "n_questions",
                    "em_rate",
                    "ci_low",
                    "ci_high",
                    "coherent_rate",
                ],
            ),
            "Change of the EM rate when ablating (paired by question, one-sided: does it fall?):\n",
            md_table(
                paired,
                [
                    "ablated",
                    "change_vs_adapted",
                    "ci_low",
                    "ci_high",
                    "n_questions",
                    "p_value_one_sided",
                    "p_method",
                ],
            ),
        ]
    else:
        out.append("_not run (no features under test, no EM judge, or --em-samples 0)_\n")
    return out


STEP = EMRateStep()

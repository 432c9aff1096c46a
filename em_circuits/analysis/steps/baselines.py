"""Step: do the tested features beat simpler edits of the adapted model?

On the causal step's validation prompts, at its size k, each edit of the adapted model
measured in the real model (:mod:`em_circuits.analysis.baselines`): the tested features, the
mean-diff subspace, the misalignment direction, the features whose activation rises most
(model diffing), the top features by linearised and by measured effect, and random features;
with, where an EM judge exists, the EM rate of free-form answers under each edit. Then what
the features add over the subspace (:mod:`em_circuits.analysis.baseline_run`).

Writes ``baselines`` (one row per method), ``baselines_overlap``, ``baseline_directions.json``,
``baselines_em_answers.csv`` (with a judge) and ``baselines_summary.json``. Under a launch
the prompt-by-prompt passes and the EM answers are shared among the processes
(:mod:`em_circuits.analysis.baseline_run`, :mod:`em_circuits.analysis.em_answers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult, records
from em_circuits.analysis.steps.baselines_report import (
    Baselines,
    BaselinesReport,
    baselines_finding,
    baselines_markdown,
)
from em_circuits.analysis.steps.causal_measure import CausalPrompt, causal_prompts
from em_circuits.analysis.steps.em_rate import em_questions
from em_circuits.core.atomic import atomic_write_text
from em_circuits.core.options import option
from em_circuits.core.report_data import Report, StoredJson
from em_circuits.core.store import read_json, write_artifact
from em_circuits.models.corpus import choose_corpus

if TYPE_CHECKING:
    from em_circuits.analysis.baseline_run import BaselineResult
    from em_circuits.analysis.steps.context import AnalysisContext

COMPARED = ("mean_diff_subspace", "misalignment_direction")


@dataclass(frozen=True)
class BaselinesParams:
    baseline_corpus_docs: int = option(
        32,
        "corpus documents whose mean feature activations (adapted - base) rank the "
        "activation-diff features",
    )
    baseline_exclude_top: int = option(
        50, "top features of the ranking never drawn as random features"
    )
    baseline_random_draws: int = option(3, "random feature sets averaged per prompt")
    baseline_em_samples: int = option(
        2, "free-form answers per question and method for the baselines' EM rates (0 = none)"
    )
    baseline_em_questions: int = option(4, "evaluation questions of the baselines' EM rates")
    baseline_em_max_new_tokens: int = option(24, "length of each baseline free-form answer")


def validation_and_discovery(ctx: AnalysisContext) -> dict[str, list[CausalPrompt]]:
    """The prompts the causal step measured on each side (measured_effects), as it built them."""
    measured = ctx.table("measured_effects")
    metas = {m["prompt_id"]: m for m in ctx.graphs["adapted"]}
    out = {}
    for side in ("discovery", "validation"):
        ids = list(dict.fromkeys(measured.loc[measured["side"] == side, "prompt_id"]))
        out[side] = causal_prompts(ctx.store, {p: metas[p] for p in ids if p in metas})
    return out


def tested_features(ctx: AnalysisContext) -> list[tuple[int, int]]:
    """The features the causal step chose to test (none when it did not run)."""
    chosen = ((ctx.summary.get("causal") or {}).get("ranking") or {}).get("chosen", [])
    return [(int(a), int(b)) for a, b in chosen]


def em_setup(ctx: AnalysisContext, samples: int, questions: int, tokens: int) -> Any:
    """(questions, sampling) of an EM measure, or None without a judge or samples."""
    from em_circuits.analysis.em_rate import SamplingParams  # noqa: PLC0415  # heavy: loads torch

    if ctx.em_judge is None or samples <= 0:
        return None
    chosen = em_questions("auto", ctx.specs["adapted"])[: max(questions, 1)]
    return chosen, SamplingParams(samples, tokens, 1.0, ctx.shared.seed)


def _em_columns(
    ctx: AnalysisContext, adapted: Any, result: BaselineResult, params: BaselinesParams
) -> tuple[pd.DataFrame | None, StoredJson]:
    """Each method's EM rate (first edit) and its change from the unedited adapted model."""

    from em_circuits.analysis.em_answers import EMCondition, judged_answers, rates_of  # noqa: PLC0415  # heavy: loads torch

    setup = em_setup(
        ctx,
        params.baseline_em_samples,
        params.baseline_em_questions,
        params.baseline_em_max_new_tokens,
    )
    if setup is None:
        why = "no EM judge" if ctx.em_judge is None else "baseline_em_samples is 0"
        return None, {"em": f"not measured: {why}"}
    questions, sampling = setup
    conditions = [EMCondition("adapted", adapted)] + [
        EMCondition(name, adapted, edits[0]) for name, edits in result.edits.items()
    ]
    answered = judged_answers(
        conditions, questions, ctx.em_judge, sampling, ctx.spread, "baselines' EM rates"
    )
    frames = [pd.DataFrame.from_records(rows) for rows in answered]
    rates = {name: rate.get("em_rate") for name, rate in rates_of(conditions, answered).items()}
    clean = rates.pop("adapted")
    table = result.table
    table["em_rate"] = [rates.get(m) for m in table["method"]]
    table["em_rate_change"] = [
        other - clean if (other := rates.get(m)) is not None and clean is not None else None
        for m in table["method"]
    ]
    return pd.concat(frames, ignore_index=True), {
        "em": {
            "judge": ctx.em_judge.id,
            "adapted_em_rate": clean,
            "n_questions": len(questions),
            "samples_per_question": sampling.n_per_question,
        }
    }


class BaselinesStep(Step):
    name = "baselines"
    Params = BaselinesParams
    Part = BaselinesReport
    shared = ("seed", "n_perm", "corpus")
    reads = ("split", "ranking", "causal")
    uses = frozenset({"graphs", "models", "em_judge"})
    # 3: a method without features or direction (no corpus, no random draw) is an empty row,
    # not the subspace's
    version = 3
    spread = True  # the site choice, the measured prompts and the EM answers

    def run(self, ctx: AnalysisContext, params: BaselinesParams) -> StepResult:
        from em_circuits.analysis.baseline_run import BaselineInputs, run_baselines  # noqa: PLC0415  # heavy: loads torch
        from em_circuits.analysis.causal import top_evil_features  # noqa: PLC0415  # heavy: loads torch

        tested = tested_features(ctx)
        if not tested:
            return StepResult()
        prompts = validation_and_discovery(ctx)
        if not prompts["discovery"] or not prompts["validation"]:
            return StepResult()
        ranked = ctx.table("top_features_adapted")
        measured = ctx.table("measured_ranking")
        corpus = choose_corpus(ctx.specs["adapted"], ctx.shared.corpus, params.baseline_corpus_docs)
        inputs = BaselineInputs(
            discovery=prompts["discovery"],
            validation=prompts["validation"],
            clusters=ctx.split().clusters,
            tested=tested,
            linearised=top_evil_features(ranked, k=len(tested)),
            measured=[(int(a), int(b)) for a, b in zip(measured["layer"], measured["feature"])],
            ranked=ranked[ranked["metric"] == "total"],
            excluded=set(top_evil_features(ranked, k=params.baseline_exclude_top)),
            corpus=corpus[0] if corpus else None,
            n_perm=ctx.shared.n_perm,
            seed=ctx.shared.seed,
            random_draws=max(params.baseline_random_draws, 1),
        )
        with ctx.model_pool() as pool:
            base, adapted = pool.load(ctx.specs["base"]), pool.load(ctx.specs["adapted"])
            result = run_baselines(base, adapted, inputs, ctx.spread)
            answers, em = _em_columns(ctx, adapted, result, params)
        if not ctx.is_main:  # every process has the merged results; the main one writes them
            return StepResult()
        ctx.write_table(result.table, "baselines")
        ctx.write_table(result.overlap, "baselines_overlap")
        if answers is not None:
            atomic_write_text(
                ctx.directory / "baselines_em_answers.csv", answers.to_csv(index=False)
            )
            ctx.wrote("baselines_em_answers.csv")
        write_artifact(
            ctx.directory / "baseline_directions.json",
            "table",
            {name: np.asarray(v).tolist() for name, v in result.directions.items()},
        )
        summary = {**result.summary, **em, "verdicts": verdicts(result.table)}
        path = ctx.directory / "baselines_summary.json"
        write_artifact(path, "table", summary)
        ctx.wrote("baseline_directions.json", "baselines_summary.json")
        return StepResult(summary={"baselines": read_json(path)})

    def report_data(self, inputs: ReportInputs) -> BaselinesReport:
        return BaselinesReport(
            baselines=Baselines(
                summary=inputs.json("baselines_summary.json"),
                table=records(inputs.table("baselines")),
                overlap=records(inputs.table("baselines_overlap")),
            )
        )

    def section(self, report: Report, analysis_rel: str) -> list[str]:
        return baselines_markdown(report, analysis_rel)

    def findings(self, report: Report) -> list[str]:
        return baselines_finding(report)


def verdicts(table: pd.DataFrame) -> dict[str, str]:
    """beat / match / lose of the tested features against each compared baseline."""
    from em_circuits.analysis.baselines import verdict  # noqa: PLC0415  # heavy: loads torch

    rows = {r["method"]: r for r in table.to_dict("records")}
    tested = rows.get("tested_features", {})
    return {name: verdict(tested, rows.get(name, {})) for name in COMPARED}


STEP = BaselinesStep()

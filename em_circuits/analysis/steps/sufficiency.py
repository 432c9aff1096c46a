"""Step: is adding the tested features to the base model enough to make it choose evil?

Steers the BASE model with the tested features' activation shifts and, at matched norm, the
mean-diff direction, the misalignment direction and random features, over a dose range
(:mod:`em_circuits.analysis.sufficiency`); measures the contrast change on the causal step's
validation prompts, the share of them whose top token turns evil, and, with an EM judge, the
EM and coherent rates of free-form answers. Writes ``sufficiency`` and ``sufficiency.json``.

Under a launch each validation prompt (every steering and patch at every dose) and each
condition's chunk of answers is a unit shared among the processes; the steering vectors, from
a few passes per discovery prompt, each process computes for itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult, records
from em_circuits.analysis.steps.baselines import em_setup, tested_features, validation_and_discovery
from em_circuits.analysis.steps.causal_measure import CausalPrompt
from em_circuits.core.markdown import fmt, md_table
from em_circuits.core.options import option
from em_circuits.core.report_data import Report, ReportPart, StoredJson, TableRecord
from em_circuits.core.store import read_json, write_artifact

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext
    from em_circuits.analysis.sufficiency import Steering

COLUMNS = [
    "method",
    "model",
    "scale",
    "contrast_change",
    "ci_low",
    "ci_high",
    "n_clusters",
    "evil_top_share",
    "em_rate",
    "coherent_rate",
]


@dataclass(frozen=True)
class SufficiencyParams:
    sufficiency_scales: tuple[float, ...] = option(
        (0.0, 0.5, 1.0, 2.0), "doses of the base-model steering (1 = the adapter's shift)"
    )
    sufficiency_em_samples: int = option(
        2, "free-form answers per question, method and dose of the steered base (0 = none)"
    )
    sufficiency_em_questions: int = option(4, "evaluation questions of the steered base")
    sufficiency_em_max_new_tokens: int = option(24, "length of each steered free-form answer")


def _steerings(
    ctx: AnalysisContext, base: Any, adapted: Any, discovery: list[CausalPrompt]
) -> tuple[dict[str, Steering], StoredJson]:
    from em_circuits.analysis.directions import (  # noqa: PLC0415  # heavy: loads torch
        last_residuals,
        unit_mean_difference,
    )
    from em_circuits.analysis.sufficiency import (  # noqa: PLC0415  # heavy: loads torch
        activation_shifts,
        direction_steering,
        feature_steering,
        random_steering,
        total_norm,
    )

    tested = tested_features(ctx)
    found = ctx.summary.get("baselines") or {}
    shifts = activation_shifts(base, adapted, discovery, tested)
    features = feature_steering(adapted, tested, shifts)
    norm = total_norm(features)
    out: dict[str, Steering] = {"tested_features": features}
    site = found.get("subspace_site")
    if site is not None:
        diff = unit_mean_difference(
            last_residuals(adapted, discovery, [site])[:, 0],
            last_residuals(base, discovery, [site])[:, 0],
        )
        out["mean_diff_direction"] = direction_steering(diff, site, norm)
    stored = ctx.json("baseline_directions.json")
    if found.get("direction_site") is not None and stored and stored.get("direction"):
        out["misalignment_direction"] = direction_steering(
            np.asarray(stored["direction"][0]), found["direction_site"], norm
        )
    random = (found.get("features") or {}).get("random_features")
    if random:
        out["random_features"] = random_steering(
            adapted, tested, shifts, [(int(a), int(b)) for a, b in random]
        )
    info = {
        "tested_features": [list(t) for t in tested],
        "activation_shifts": [float(s) for s in shifts],
        "matched_norm": norm,
        "sites": {name: sorted(s) for name, s in out.items()},
    }
    return out, info


def _patch_sets(ctx: AnalysisContext) -> dict[str, list[tuple[int, int]]]:
    """The feature sets whose adapted activations are written into the base: the tested
    features and, as control, the baselines' random features (contrast only: a patch is of
    one prompt's positions, so no free-form answers)."""
    sets = {"tested_features_patched": tested_features(ctx)}
    random = ((ctx.summary.get("baselines") or {}).get("features") or {}).get("random_features")
    if random:
        sets["random_features_patched"] = [(int(a), int(b)) for a, b in random]
    return sets


def _steered_name(name: str, scale: float) -> str:
    return f"{name} x{float(scale)!r}"


def _em_rates(
    ctx: AnalysisContext,
    base: Any,
    adapted: Any,
    steerings: dict[str, Steering],
    scales: tuple[float, ...],
    em: Any,
) -> dict[str, dict[str, Any]]:
    """The EM and coherent rates of the adapted model, the base, and the base under each
    steering at each dose but 0 (the base itself), by condition name; every condition's
    chunks of answers are units of the step's spread."""
    from em_circuits.analysis.em_answers import EMCondition, judged_answers, rates_of  # noqa: PLC0415  # heavy: loads torch
    from em_circuits.analysis.sufficiency import steering_edit  # noqa: PLC0415  # heavy: loads torch

    if em is None:
        return {}
    conditions = [EMCondition("adapted", adapted), EMCondition("base", base)]
    for name, steering in steerings.items():
        for scale in dict.fromkeys(s for s in scales if s != 0):
            edit = steering_edit(base, steering, scale)
            conditions.append(EMCondition(_steered_name(name, scale), base, edit))
    answered = judged_answers(conditions, em[0], ctx.em_judge, em[1], ctx.spread, "sufficiency")
    return {
        name: {"em_rate": rate.get("em_rate"), "coherent_rate": rate.get("coherent_rate")}
        for name, rate in rates_of(conditions, answered).items()
    }


def _rows(
    ctx: AnalysisContext,
    validation: list[CausalPrompt],
    measured: list[dict[str, Any]],
    em_rates: dict[str, dict[str, Any]],
    scales: tuple[float, ...],
) -> list[TableRecord]:
    """The table's rows from every prompt's measurements and the EM rates: the adapted model
    against the base, each steering per dose, each patched set per dose."""
    from em_circuits.analysis.baselines import change_statistics  # noqa: PLC0415  # heavy: loads torch

    ids = [p["prompt_id"] for p in validation]
    clusters = ctx.split().clusters

    def statistics(deltas: list[float]) -> dict[str, Any]:
        return change_statistics(np.array(deltas), ids, clusters, ctx.shared.n_perm, 0)

    def share(flags: list[bool]) -> float:
        return sum(int(f) for f in flags) / max(len(flags), 1)

    rows: list[TableRecord] = [
        {
            "method": "adapted_reference",
            "model": "adapted",
            "scale": 1.0,
            **statistics([m["adapted"][0] - m["clean"] for m in measured]),
            "evil_top_share": share([m["adapted"][1] for m in measured]),
            **em_rates.get("adapted", {}),
        }
    ]
    for kind in ("steered", "patched"):
        for name in measured[0][kind] if measured else []:
            for j, scale in enumerate(scales):
                row = {"method": name, "model": "base", "scale": float(scale)}
                row.update(statistics([m[kind][name][j][0] for m in measured]))
                row["evil_top_share"] = share([m[kind][name][j][1] for m in measured])
                if kind == "steered":
                    row.update(
                        em_rates.get("base" if scale == 0 else _steered_name(name, scale), {})
                    )
                rows.append(row)
    return rows


@dataclass(frozen=True)
class Sufficiency:
    """The report's entry on sufficiency (report.json ``sufficiency``)."""

    #: sufficiency.json (None when the step did not run)
    summary: StoredJson | None = None
    #: every row of sufficiency.csv
    table: list[TableRecord] = field(default_factory=list)


@dataclass(frozen=True)
class SufficiencyReport(ReportPart):
    sufficiency: Sufficiency = field(default_factory=Sufficiency)


class SufficiencyStep(Step):
    name = "sufficiency"
    Params = SufficiencyParams
    Part = SufficiencyReport
    shared = ("seed", "n_perm")
    reads = ("split", "causal", "baselines")
    uses = frozenset({"graphs", "models", "em_judge"})
    version = 3  # EM answers sampled many questions per generate call (em_sampling)
    spread = True  # the validation prompts' passes and the EM answers

    def run(self, ctx: AnalysisContext, params: SufficiencyParams) -> StepResult:
        from em_circuits.analysis.baseline_run import prompt_cost  # noqa: PLC0415  # heavy: loads torch
        from em_circuits.analysis.sufficiency import measure_prompt  # noqa: PLC0415  # heavy: loads torch

        if not tested_features(ctx) or "baselines" not in ctx.summary:
            return StepResult()
        prompts = validation_and_discovery(ctx)
        validation = prompts["validation"]
        em = em_setup(
            ctx,
            params.sufficiency_em_samples,
            params.sufficiency_em_questions,
            params.sufficiency_em_max_new_tokens,
        )
        scales = params.sufficiency_scales
        with ctx.model_pool() as pool:
            base, adapted = pool.load(ctx.specs["base"]), pool.load(ctx.specs["adapted"])
            steerings, info = _steerings(ctx, base, adapted, prompts["discovery"])
            patched = _patch_sets(ctx)
            measured = ctx.spread(
                "validation",
                validation,
                lambda p: measure_prompt(base, adapted, p, steerings, patched, scales),
                cost=prompt_cost,
                key=lambda p: str(p["prompt_id"]),
            )
            em_rates = _em_rates(ctx, base, adapted, steerings, scales, em)
        if not ctx.is_main:  # every process has the merged results; the main one writes them
            return StepResult()
        rows = _rows(ctx, validation, measured, em_rates, scales)
        table = pd.DataFrame.from_records(rows).reindex(columns=COLUMNS)
        ctx.write_table(table, "sufficiency")
        summary = {
            **info,
            "n_prompts": len(validation),
            "em": {"judge": ctx.em_judge.id, "n_questions": len(em[0])}
            if em is not None
            else "not measured: no EM judge or sufficiency_em_samples is 0",
        }
        path = ctx.directory / "sufficiency.json"
        write_artifact(path, "table", summary)
        ctx.wrote("sufficiency.json")
        return StepResult(summary={"sufficiency": read_json(path)})

    def report_data(self, inputs: ReportInputs) -> SufficiencyReport:
        return SufficiencyReport(
            sufficiency=Sufficiency(
                summary=inputs.json("sufficiency.json"),
                table=records(inputs.table("sufficiency")),
            )
        )

    def section(self, report: Report, analysis_rel: str) -> list[str]:
        out = ["## Sufficiency\n"]
        data = report.part(SufficiencyReport).sufficiency
        summary = data.summary
        if not summary:
            return [*out, "_not run (no tested features or no baselines)_\n"]
        em = summary.get("em")
        return [
            *out,
            "Is adding the tested features to the **base** model enough to make it choose the "
            "evil token? Each feature's activation shift (adapted minus base mean activation "
            f"over the discovery prompts: {', '.join(fmt(s) for s in summary['activation_shifts'])}"
            ") times its decoder vector is added, times the dose, at every position but BOS "
            "where the feature writes; the mean-diff direction (unit mean of adapted-minus-base "
            "last-position residuals), the misalignment direction and random features are added "
            f"at the same norm ({fmt(summary['matched_norm'])} at dose 1). Contrast change of "
            f"the base on the {summary['n_prompts']} validation prompts (95% t interval over "
            "clusters), the share of them whose top next token is evil-labeled, and "
            + (
                f"the EM and coherent rates of free-form answers (judge {em['judge']})"
                if isinstance(em, dict)
                else f"no EM rates ({em})"
            )
            + ". The first row is the adapted model itself against the base (the gap to "
            "close). `tested_features_patched` writes each tested feature's activations in the "
            "adapted model into the base on the same prompt, position by position (dose 1: "
            "exactly the adapted values; between: moved part of the way), with "
            "`random_features_patched` (the baselines' random features) as control: no free-form "
            "answers there, since a patch is of one prompt's positions.\n",
            md_table(data.table, COLUMNS),
            f"Full table: `{analysis_rel}/sufficiency.csv`.\n",
        ]

    def findings(self, report: Report) -> list[str]:
        rows = report.part(SufficiencyReport).sufficiency.table
        if not rows:
            return []
        top = max(r["scale"] for r in rows if r["model"] == "base")
        at = {r["method"]: r for r in rows if r["model"] == "base" and r["scale"] == top}
        gap: TableRecord = next((r for r in rows if r["model"] == "adapted"), {})
        tested = at.get("tested_features") or {}
        direction = at.get("mean_diff_direction") or {}
        turns = (tested.get("evil_top_share") or 0) > 0
        em = tested.get("em_rate")
        patched = at.get("tested_features_patched") or {}
        random = at.get("random_features_patched") or {}
        patch = (
            f" Writing the features' adapted activations into the base position by position "
            f"(dose {fmt(top)}) changes its contrast by {fmt(patched.get('contrast_change'))} "
            f"(95% CI {fmt(patched.get('ci_low'))} to {fmt(patched.get('ci_high'))}), "
            f"{_share(patched.get('contrast_change'), gap.get('contrast_change'))} of the gap, "
            f"evil top token on {fmt(patched.get('evil_top_share'))}; random features patched "
            f"the same way: {fmt(random.get('contrast_change'))}."
            if patched
            else ""
        )
        turns = turns or (patched.get("evil_top_share") or 0) > 0
        return [
            f"**Sufficiency ({'features make the base choose evil' if turns else 'not shown'}):**"
            f" at dose {fmt(top)} the tested features change the base's contrast by "
            f"{fmt(tested.get('contrast_change'))} (95% CI {fmt(tested.get('ci_low'))} to "
            f"{fmt(tested.get('ci_high'))}; the adapter's own gap is "
            f"{fmt(gap.get('contrast_change'))}), the top token is evil on "
            f"{fmt(tested.get('evil_top_share'))} of the prompts"
            + (f", EM rate {fmt(em)}" if em is not None else "")
            + f"; the mean-diff direction at the same norm: {fmt(direction.get('contrast_change'))}"
            f", evil top token on {fmt(direction.get('evil_top_share'))}"
            + (
                f", EM rate {fmt(direction.get('em_rate'))}"
                if direction.get("em_rate") is not None
                else ""
            )
            + "."
            + patch
        ]


def _share(part: Any, whole: Any) -> str:
    """``part`` as a share of ``whole`` ("n/a" where either is missing or whole is 0)."""
    if part is None or not whole:
        return "n/a"
    return fmt(float(part) / float(whole))


STEP = SufficiencyStep()

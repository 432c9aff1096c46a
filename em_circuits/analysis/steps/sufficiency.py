"""Step: is adding the tested features to the base model enough to make it choose evil?

Steers the BASE model with the tested features' activation shifts and, at matched norm, the
mean-diff direction, the misalignment direction and random features, over a dose range
(:mod:`em_circuits.analysis.sufficiency`); measures the contrast change on the causal step's
validation prompts, the share of them whose top token turns evil, and, with an EM judge, the
EM and coherent rates of free-form answers. Writes ``sufficiency`` and ``sufficiency.json``.
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


def _patched_rows(
    ctx: AnalysisContext,
    base: Any,
    adapted: Any,
    validation: list[CausalPrompt],
    clean: list[float],
    scales: tuple[float, ...],
) -> list[TableRecord]:
    """The tested features' (and, as control, the random features') adapted activations
    written into the base position by position, over the doses: contrast only (a patch is of
    one prompt's positions, so no free-form answers)."""
    from em_circuits.analysis.baselines import change_statistics  # noqa: PLC0415  # heavy: loads torch
    from em_circuits.analysis.sufficiency import patched_changes  # noqa: PLC0415  # heavy: loads torch

    ids = [p["prompt_id"] for p in validation]
    clusters = ctx.split().clusters
    sets = {"tested_features_patched": tested_features(ctx)}
    random = ((ctx.summary.get("baselines") or {}).get("features") or {}).get("random_features")
    if random:
        sets["random_features_patched"] = [(int(a), int(b)) for a, b in random]
    rows = []
    for name, keys in sets.items():
        for scale in scales:
            deltas, evil = patched_changes(base, adapted, validation, keys, scale, clean)
            row = {"method": name, "model": "base", "scale": float(scale), "evil_top_share": evil}
            row.update(change_statistics(deltas, ids, clusters, ctx.shared.n_perm, 0))
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

    def run(self, ctx: AnalysisContext, params: SufficiencyParams) -> StepResult:
        from em_circuits.analysis.baselines import change_statistics, real_contrast  # noqa: PLC0415  # heavy: loads torch
        from em_circuits.analysis.em_rate import em_rate_under  # noqa: PLC0415  # heavy: loads torch
        from em_circuits.analysis.sufficiency import evil_top_share, steered_changes, steering_edit  # noqa: PLC0415  # heavy: loads torch

        if not tested_features(ctx) or "baselines" not in ctx.summary:
            return StepResult()
        prompts = validation_and_discovery(ctx)
        validation = prompts["validation"]
        ids = [p["prompt_id"] for p in validation]
        clusters = ctx.split().clusters
        em = em_setup(
            ctx,
            params.sufficiency_em_samples,
            params.sufficiency_em_questions,
            params.sufficiency_em_max_new_tokens,
        )
        rows = []
        with ctx.model_pool() as pool:
            base, adapted = pool.load(ctx.specs["base"]), pool.load(ctx.specs["adapted"])
            steerings, info = _steerings(ctx, base, adapted, prompts["discovery"])
            clean = [real_contrast(base, p) for p in validation]

            def em_of(model: Any, edit: Any) -> dict[str, float | None]:
                if em is None:
                    return {}
                _, rate = em_rate_under(model, em[0], ctx.em_judge, em[1], edit)
                return {"em_rate": rate.get("em_rate"), "coherent_rate": rate.get("coherent_rate")}

            gap = [real_contrast(adapted, p) - c for p, c in zip(validation, clean)]
            rows.append(
                {
                    "method": "adapted_reference",
                    "model": "adapted",
                    "scale": 1.0,
                    **change_statistics(np.array(gap), ids, clusters, ctx.shared.n_perm, 0),
                    "evil_top_share": evil_top_share(adapted, validation, None),
                    **em_of(adapted, None),
                }
            )
            unsteered = em_of(base, None)
            for name, steering in steerings.items():
                for scale in params.sufficiency_scales:
                    deltas = steered_changes(base, validation, steering, scale, clean)
                    edit = steering_edit(base, steering, scale)
                    row = {"method": name, "model": "base", "scale": float(scale)}
                    row.update(change_statistics(deltas, ids, clusters, ctx.shared.n_perm, 0))
                    row["evil_top_share"] = evil_top_share(base, validation, edit)
                    row.update(unsteered if scale == 0 else em_of(base, edit))
                    rows.append(row)
            rows += _patched_rows(ctx, base, adapted, validation, clean, params.sufficiency_scales)
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

"""Step: which prompts rank features (discovery) and which test them (validation).

Only prompts whose stored verdict is divergent (the rule of
:func:`em_circuits.core.verdicts.is_divergent`) are analysed unless ``include_flagged``;
whole clusters (a scenario with its rephrasings and near duplicates) go to one side, and the
validation side shares no template, lead-in or distractor with the discovery side
(:func:`em_circuits.analysis.split.held_out_split`); writes ``split.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from em_circuits.analysis.split import LEFT_OUT_PHRASING, held_out_split
from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult
from em_circuits.core.labeling_records import load_verdict
from em_circuits.core.options import option
from em_circuits.core.report_data import Report, ReportPart, StoredJson
from em_circuits.core.store import write_artifact
from em_circuits.core.verdicts import DIVERGENCE_TAU_ADAPTED, DIVERGENCE_TAU_BASE

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext

log = logging.getLogger(__name__)

NOT_DIVERGENT = "not divergent (flagged only)"
NO_VERDICT = "no stored verdict"


@dataclass(frozen=True)
class SplitParams:
    validation_fraction: float = option(
        0.5, "share of the prompts (whole clusters) held out of the ranking for the causal tests"
    )
    include_flagged: bool = option(
        False,
        "also analyse prompts the judge flagged that fail the divergence rule (adapted evil "
        f"mass >= {DIVERGENCE_TAU_ADAPTED:g}, base <= {DIVERGENCE_TAU_BASE:g}); by default "
        "only divergent prompts are analysed",
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in (0, 1), not {self.validation_fraction}"
            )


def excluded_prompts(
    ctx: AnalysisContext, prompt_ids: list[str], include_flagged: bool
) -> dict[str, str]:
    """prompt id -> why it is not analysed: not divergent by its stored verdict, or no
    verdict (nothing, with ``include_flagged``)."""
    if include_flagged:
        return {}

    out = {}
    for pid in prompt_ids:
        verdict = load_verdict(ctx.store, ctx.slugs["adapted"], pid)
        if verdict is None:
            out[pid] = NO_VERDICT
        elif not verdict.get("divergent"):
            out[pid] = NOT_DIVERGENT
    return out


@dataclass(frozen=True)
class SplitReport(ReportPart):
    #: split.json's description of the split (sizes, testability, what was left out), without
    #: its per-prompt rows; empty without an analysis
    split: StoredJson = field(default_factory=dict)


class SplitStep(Step):
    name = "split"
    Part = SplitReport
    Params = SplitParams
    shared = ("seed",)
    uses = frozenset({"graphs", "verdicts"})
    needs_prompts = False
    version = 2  # divergent prompts only; held out by phrasing

    def run(self, ctx: AnalysisContext, params: SplitParams) -> StepResult:
        base, adapted = ctx.effects("base"), ctx.effects("adapted")
        ids = sorted(adapted.effects)
        excluded = excluded_prompts(ctx, ids, params.include_flagged)
        split = held_out_split(
            (ctx.store.load_prompt(pid) for pid in ids),
            params.validation_fraction,
            ctx.shared.seed,
            excluded,
        )
        paired = sorted(set(base.effects) & set(adapted.effects) & set(split.discovery))
        write_artifact(ctx.directory / "split.json", "table", split.record())
        ctx.wrote("split.json")
        if not adapted.effects:
            log.warning(
                "no adapted-model graphs with an evil-vs-safe contrast under %s",
                ctx.store.graphs_dir(ctx.slugs["adapted"]),
            )
        elif excluded and len(excluded) == len(ids):
            log.warning(
                "none of the %d prompts with graphs is divergent (%s); nothing to analyse: "
                "--include-flagged analyses the flagged ones",
                len(ids),
                ", ".join(
                    f"{n} {why}" for why, n in split.describe()["left_out_by_reason"].items()
                ),
            )
        left_out = ctx.left_out
        return StepResult(
            summary={
                "prompts": {
                    "base": len(base.effects),
                    # the prompts analysed: the later steps are skipped when there are none
                    "adapted": len(split.discovery) + len(split.validation),
                    "adapted_graphs": len(adapted.effects),
                    "paired_discovery": len(paired),
                    "include_flagged": params.include_flagged,
                },
                "split": split.describe(),
                # Graphs that failed their integrity or finiteness check (each named in a
                # warning); without them the tables are not those of the inputs, so nothing is
                # reused: the next run (after `em-circuits graphs` recomputed them) redoes them.
                "left_out": left_out,
            },
            reusable=not left_out,
        )

    def findings(self, report: Report) -> list[str]:
        split = report.part(SplitReport).split
        out = []
        reasons = split.get("left_out_by_reason") or {}
        if split:
            phrasing = split.get("phrasing") or {}
            analysed = split.get("discovery_prompts", 0) + split.get("validation_prompts", 0)
            left = "; ".join(f"{n} {why}" for why, n in reasons.items()) or "none"
            out.append(
                f"**Prompts analysed:** {analysed} ({split.get('discovery_clusters')} discovery "
                f"and {split.get('validation_clusters')} validation clusters); left out: {left}"
                + (
                    " (`--include-flagged` adds the flagged prompts that fail the divergence rule)"
                    if NOT_DIVERGENT in reasons
                    else ""
                )
                + ". Held out by scenario"
                + (f" and by {', '.join(phrasing['held_out'])}" if phrasing.get("held_out") else "")
                + (
                    f"; shared by both sides (holding it out left too few clusters): "
                    f"{', '.join(phrasing['shared'])}"
                    if phrasing.get("shared")
                    else ""
                )
                + (
                    f"; the same in every prompt: {', '.join(phrasing['in_every_prompt'])}"
                    if phrasing.get("in_every_prompt")
                    else ""
                )
                + (
                    f"; prompts left out as '{LEFT_OUT_PHRASING}' link the two sides"
                    if LEFT_OUT_PHRASING in reasons
                    else ""
                )
                + "."
            )
        if split and not split.get("testable"):
            out.append(
                f"**Too few prompts:** {split.get('validation_clusters')} validation clusters; "
                "no test can reach p < 0.05 with fewer than "
                f"{split.get('min_validation_clusters')}. Every number is descriptive."
            )
        return out

    def report_data(self, inputs: ReportInputs) -> SplitReport:
        split = inputs.json("split.json") or {}
        return SplitReport(
            split={
                k: v
                for k, v in split.items()
                if k not in ("prompts", "schema", "schema_version", "created")
            }
        )


STEP = SplitStep()

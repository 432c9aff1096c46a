"""Step: which prompts rank features (discovery) and which test them (validation).

Whole clusters (a scenario with its rephrasings and near duplicates) go to one side
(:mod:`em_circuits.analysis.split`); writes ``split.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from em_circuits.analysis.split import prompt_clusters, split_by_cluster
from em_circuits.analysis.steps.base import Step, StepResult
from em_circuits.core.options import option
from em_circuits.core.store import write_artifact

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitParams:
    validation_fraction: float = option(
        0.5, "share of the prompts (whole clusters) held out of the ranking for the causal tests"
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in (0, 1), not {self.validation_fraction}"
            )


class SplitStep(Step):
    name = "split"
    Params = SplitParams
    shared = ("seed",)
    uses = frozenset({"graphs"})
    needs_prompts = False

    def run(self, ctx: AnalysisContext, params: SplitParams) -> StepResult:
        base, adapted = ctx.effects("base"), ctx.effects("adapted")
        split = split_by_cluster(
            prompt_clusters(ctx.store.load_prompt(pid) for pid in sorted(adapted.effects)),
            params.validation_fraction,
            ctx.shared.seed,
        )
        paired = sorted(set(base.effects) & set(adapted.effects) & set(split.discovery))
        write_artifact(ctx.directory / "split.json", "table", split.record())
        ctx.wrote("split.json")
        if not adapted.effects:
            log.warning(
                "no adapted-model graphs with an evil-vs-safe contrast under %s",
                ctx.store.graphs_dir(ctx.slugs["adapted"]),
            )
        left_out = ctx.left_out
        return StepResult(
            summary={
                "prompts": {
                    "base": len(base.effects),
                    "adapted": len(adapted.effects),
                    "paired_discovery": len(paired),
                },
                "split": split.describe(),
                # Graphs that failed their integrity or finiteness check (each named in a
                # warning); without them the tables are not those of the inputs, so nothing is
                # reused: the next run (after `em-circuits graphs` recomputed them) redoes them.
                "left_out": left_out,
            },
            reusable=not left_out,
        )

    def findings(self, report: Mapping[str, Any]) -> list[str]:
        split = report.get("split") or {}
        if split and not split.get("testable"):
            return [
                f"**Too few prompts:** {split.get('validation_clusters')} validation clusters; "
                "no test can reach p < 0.05 with fewer than "
                f"{split.get('min_validation_clusters')}. Every number is descriptive."
            ]
        return []

    def report_data(self, inputs: Any) -> dict[str, Any]:
        split = inputs.json("split.json") or {}
        return {
            "split": {
                k: v
                for k, v in split.items()
                if k not in ("prompts", "schema", "schema_version", "created")
            }
        }


STEP = SplitStep()

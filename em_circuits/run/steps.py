"""The analysis's steps, in report order, and their parameters.

Adding an analysis step is one new module with a ``STEP`` and one line here. The steps run in
an order where every step comes after the steps it reads (:func:`run_order`); the report
renders their sections and Findings in the order of this list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from em_circuits.analysis.steps import (
    adapter_nodes,
    base_vs_adapted,
    baselines,
    causal,
    decomposition,
    em_rate,
    ranking,
    split,
    stability,
    sufficiency,
    transcoder_quality,
    validation,
)
from em_circuits.analysis.steps.base import SharedParams, Step
from em_circuits.core.options import check_shared_fields, option_fields
from em_circuits.core.sections import Section
from em_circuits.interpret import card_step
from em_circuits.labeling import calibration_section

#: Every part of the report an analysis makes, in report order.
SECTIONS: tuple[Section, ...] = (
    ranking.STEP,
    validation.STEP,
    base_vs_adapted.STEP,
    decomposition.STEP,
    adapter_nodes.STEP,
    causal.STEP,
    baselines.STEP,
    sufficiency.STEP,
    card_step.STEP,
    em_rate.STEP,
    calibration_section.SECTION,
    stability.STEP,
    transcoder_quality.STEP,
    split.STEP,
)

STEPS: tuple[Step, ...] = tuple(s for s in SECTIONS if isinstance(s, Step))


def run_order(steps: Sequence[Step] = STEPS) -> list[Step]:
    """The steps in list order, each moved after the steps it reads."""
    names = {s.name for s in steps}
    for step in steps:
        missing = [r for r in step.reads if r not in names]
        if missing:
            raise ValueError(f"step {step.name} reads {missing}, which no step computes")
    done: list[Step] = []
    left = list(steps)
    while left:
        ready = next((s for s in left if all(r in {d.name for d in done} for r in s.reads)), None)
        if ready is None:
            raise ValueError(f"steps that read each other: {[s.name for s in left]}")
        done.append(ready)
        left.remove(ready)
    return done


def _step_params(steps: Sequence[Step]) -> dict[str, Any]:
    return {s.name: s.Params() for s in steps}


@dataclass(frozen=True)
class AnalysisParams:
    """The analysis's parameters: the shared ones and each step's own.

    ``AnalysisParams.of(position="last", causal_top_k=3)`` sets fields by name wherever they
    live; ``params.flat()`` lists every field by name (summary.json, the report).
    """

    shared: SharedParams = field(default_factory=SharedParams)
    steps: Mapping[str, Any] = field(default_factory=lambda: _step_params(STEPS))

    @classmethod
    def of(cls, **values: Any) -> AnalysisParams:
        """Default parameters with the named fields set; an unknown name is a TypeError."""
        owners = field_owners()
        unknown = sorted(set(values) - set(owners))
        if unknown:
            raise TypeError(f"unknown analysis parameter(s): {', '.join(unknown)}")
        shared = {k: v for k, v in values.items() if owners[k] == "shared"}
        steps = {}
        for step in STEPS:
            own = {k: v for k, v in values.items() if owners[k] == step.name}
            steps[step.name] = step.Params(**own)
        return cls(SharedParams(**shared), steps)

    def step(self, name: str) -> Any:
        return self.steps[name]

    def flat(self) -> dict[str, Any]:
        """Every field by name: the shared ones, then each step's in run order."""
        out = dataclasses.asdict(self.shared)
        for step in STEPS:
            out.update(dataclasses.asdict(self.steps[step.name]))
        return out

    def __getattr__(self, name: str) -> Any:
        # params.seed, params.em_samples: a field read wherever it lives
        if name.startswith("_") or name in ("shared", "steps"):
            raise AttributeError(name)
        for params in (self.shared, *self.steps.values()):
            if name in {f.name for f in dataclasses.fields(params)}:
                return getattr(params, name)
        raise AttributeError(name)


def field_owners() -> dict[str, str]:
    """Each analysis parameter's name -> "shared" or the step that owns it."""
    owners = {f.name: "shared" for f, _, _ in option_fields(SharedParams)}
    for step in STEPS:
        for f, _, _ in option_fields(step.Params):
            if f.name in owners:
                raise TypeError(f"{step.name} and {owners[f.name]} both define {f.name}")
            owners[f.name] = step.name
    return owners


def params_classes() -> list[type]:
    """The dataclasses whose fields are the analysis's flags."""
    classes = [SharedParams, *(s.Params for s in STEPS)]
    check_shared_fields(classes)
    return classes

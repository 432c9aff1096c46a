"""What every analysis step is: its parameters, its run, its files, its report section.

The feature analysis is an ordered list of steps (``em_circuits.run.steps.STEPS``). A step is
one module with one :class:`Step` subclass:

* ``Params``: a frozen dataclass of :func:`~em_circuits.core.options.option` fields; the
  command-line flags are generated from it, so each default exists once;
* ``shared``: the :class:`SharedParams` it reads (position, seed, ... that several steps use);
* ``reads``: the steps whose files it reads; ``uses``: what else its result depends on
  (the graphs, the models, the EM judge, the feature labeller);
* ``run(ctx, params)``: computes, writes its files through the context, returns a
  :class:`StepResult`;
* ``report_data`` / ``section`` / ``findings``: its part of report.json, report.md and the
  Findings.

Each step is cached on its own, keyed by its parameters, what it uses and the keys of the
steps it reads (:func:`step_key`): changing one step's parameter recomputes that step and the
steps that read it, nothing else.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from em_circuits.core.atomic import atomic_write_text
from em_circuits.core.cache import cache_key
from em_circuits.core.naming import feature_name
from em_circuits.core.options import option
from em_circuits.core.sections import ReportInputs, Section, read_table, records

__all__ = ["ReportInputs", "Section", "read_table", "records"]

log = logging.getLogger(__name__)


def _position(value: str) -> str:
    from em_circuits.analysis.effects import parse_position  # noqa: PLC0415  # heavy: loads torch

    parse_position(value)  # ValueError naming the options
    return value


@dataclass(frozen=True)
class SharedParams:
    """Parameters several steps read (each step names the ones it uses)."""

    position: str = option(
        "any",
        "feature identity: any (summed over positions), last, or rel:-k (k-th position from "
        "the end); features are never matched by graph index",
        parse=_position,
    )
    min_support: int = option(2, "prompts a feature must appear in to be ranked")
    absent: str = option(
        "zero",
        "a feature absent from a prompt's graph counts as 0, or is left out",
        choices=("zero", "missing"),
    )
    n_perm: int = option(
        9999,
        "Monte Carlo sign flips where the test is not exact (exact up to 16 clusters, when "
        "every sign agrees, and up to 40 clusters where p is small)",
    )
    seed: int = option(0, "prompt sampling, permutations, controls, answers")
    corpus: str | None = option(
        None,
        "corpus of the feature activation index: a text file (documents separated by blank "
        "lines) or JSONL with a 'text' field (default: the toy organism's documents)",
    )
    corpus_docs: int = option(400, "documents of the corpus to index")

    def __post_init__(self) -> None:
        _position(self.position)
        if self.absent not in ("zero", "missing"):
            raise ValueError(f"absent must be 'zero' or 'missing', not {self.absent!r}")


@dataclass(frozen=True)
class NoParams:
    """The parameters of a step that has none of its own."""


#: A step's entries of summary.json: entry name -> the JSON the step computed (free-form: each
#: step's own record, as it writes it to disk; a later step reads another's through the
#: analysis context, the report through the step's own report part).
StepSummary = dict[str, Any]


@dataclass
class StepResult:
    """What one step's run leaves beside its files: its entries of summary.json."""

    summary: StepSummary = field(default_factory=dict)
    #: False when the result must not be reused (a graph failed its check): the next run
    #: computes it, and every step that reads it, again.
    reusable: bool = True


class Step(Section):
    """One analysis step (see the module's docstring)."""

    Params: ClassVar[type] = NoParams
    shared: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[tuple[str, ...]] = ()
    #: of "graphs", "verdicts", "models", "em_judge", "labeller"
    uses: ClassVar[frozenset[str]] = frozenset()
    #: skipped (nothing written) when no adapted graph has an evil-vs-safe contrast
    needs_prompts: ClassVar[bool] = True
    #: raised when what the step computes changes, so stored results are recomputed
    version: ClassVar[int] = 1
    #: runs on every process of a launch, its heavy work shared through
    #: :meth:`~em_circuits.analysis.steps.context.AnalysisContext.spread` (only the main
    #: process writes its files); any other step runs on the main process alone
    spread: ClassVar[bool] = False

    def run(self, ctx: Any, params: Any) -> StepResult:
        raise NotImplementedError


def shared_values(step: Step, shared: SharedParams) -> dict[str, object]:
    return {name: getattr(shared, name) for name in step.shared}


def step_key(
    step: Step,
    params: Any,
    shared: SharedParams,
    uses: Mapping[str, object],
    upstream: Mapping[str, str],
) -> str:
    """A hash of everything one step's result is computed from."""
    return cache_key(
        {
            "step": step.name,
            "version": step.version,
            "params": dataclasses.asdict(params),
            "shared": shared_values(step, shared),
            "uses": {name: uses[name] for name in sorted(step.uses)},
            "reads": {name: upstream[name] for name in step.reads},
        }
    )


def write_table(frame: pd.DataFrame, directory: Path, name: str) -> list[str]:
    """CSV for pandas/spreadsheets and JSON records for scripts, both written atomically;
    returns the file names. A table of features leads with their one name (``L3 #1234``),
    as report and viewer."""
    features = ["layer", "feature"]
    if (
        set(features) <= set(frame.columns)
        and "name" not in frame.columns
        and frame[features].notna().all().all()
    ):
        names = [feature_name(lay, f) for lay, f in zip(frame["layer"], frame["feature"])]
        frame = frame.assign(name=names)[["name", *frame.columns]]
    atomic_write_text(directory / f"{name}.csv", frame.to_csv(index=False))
    atomic_write_text(
        directory / f"{name}.json", frame.to_json(orient="records", indent=1, double_precision=6)
    )
    return [f"{name}.csv", f"{name}.json"]

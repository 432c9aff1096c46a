"""The causal step's measurements, each prompt's shared among the processes of a launch.

Single-feature ablations on the discovery prompts choose the features under test; those are
measured on the validation prompts, and the dose-response compares them with matched random
features (:mod:`em_circuits.analysis.causal`). Each measurement runs prompt by prompt through
:meth:`~em_circuits.analysis.steps.context.AnalysisContext.spread`: every process gets the
merged tables, identical to one process's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from em_circuits.core.report_data import StoredJson
from em_circuits.core.store import ResultsStore

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext


#: A stored prompt record with its labeled evil and safe token ids (``evil_ids``,
#: ``safe_ids``): what :mod:`em_circuits.analysis.causal`'s interventions take.
CausalPrompt = dict[str, Any]


def causal_prompts(
    store: ResultsStore, metas: Mapping[str, Mapping[str, Any]]
) -> list[CausalPrompt]:
    """The stored prompt records (the model renders them as the attribution did: chat prompts
    through the chat template) with their labeled evil and safe token ids."""
    prompts = []
    for pid, meta in metas.items():
        targets = meta["targets"]
        prompts.append(
            {
                **store.load_prompt(pid),
                "evil_ids": [t["token_id"] for t in targets if t["label"] == "evil"],
                "safe_ids": [t["token_id"] for t in targets if t["label"] == "safe"],
            }
        )
    return prompts


@dataclass
class Measured:
    """The single-feature ablations and the features they choose."""

    discovery: pd.DataFrame
    validation: pd.DataFrame
    ranking: pd.DataFrame
    column: str
    top: list[tuple[int, int]]
    none_lowered: bool


def _prompt_cost(prompt: CausalPrompt) -> float:
    """What one prompt's interventions cost, relative to the others': its length."""
    return float(len(prompt["text"]))


def measure(
    ctx: AnalysisContext,
    name: str,
    model: Callable[[], Any],
    prompts: list[CausalPrompt],
    features: list[tuple[int, int]],
    position: str,
) -> pd.DataFrame:
    """Each feature ablated alone on each prompt (the prompts shared among the processes)."""
    from em_circuits.analysis.measured import (  # noqa: PLC0415  # heavy: loads torch
        MEASURED_COLUMNS,
        measured_ablation_effects,
    )

    per_prompt = ctx.spread(
        name,
        prompts,
        lambda p: measured_ablation_effects(model(), [p], features, position).to_dict("records"),
        cost=_prompt_cost,
        key=lambda p: json.dumps([p["prompt_id"], [list(f) for f in features]]),
    )
    rows = [row for prompt_rows in per_prompt for row in prompt_rows]
    return pd.DataFrame.from_records(rows, columns=MEASURED_COLUMNS)


def choose(
    ctx: AnalysisContext,
    adapted: Callable[[], Any],
    prompts: dict[str, list[CausalPrompt]],
    candidates: list[tuple[int, int]],
    effects: dict[str, pd.DataFrame],
    top_k: int,
    position: str,
) -> Measured:
    """Measure every candidate on the discovery prompts, keep the ``top_k`` that lower the
    contrast most, and measure those on the validation prompts."""
    from em_circuits.analysis.measured import (  # noqa: PLC0415  # heavy: loads torch
        rank_by_measured,
        with_linearised,
    )

    discovery = with_linearised(
        measure(ctx, "discovery", adapted, prompts["discovery"], candidates, position), effects
    )
    column = "delta_unfrozen" if discovery["delta_unfrozen"].notna().any() else "delta_frozen"
    ranking = rank_by_measured(discovery, column)
    lowering = ranking[ranking["measured_delta"] < 0]
    chosen = lowering if len(lowering) else ranking
    top = [(int(la), int(f)) for la, f in zip(chosen["layer"], chosen["feature"])][:top_k]
    validation = with_linearised(
        measure(ctx, "validation", adapted, prompts["validation"], top, position), effects
    )
    return Measured(discovery, validation, ranking, column, top, bool(len(lowering) == 0))


def dose_response(
    ctx: AnalysisContext,
    name: str,
    model: Callable[[], Any],
    prompts: list[CausalPrompt],
    top: list[tuple[int, int]],
    scales: Sequence[float],
    n_random: int,
) -> tuple[pd.DataFrame, StoredJson]:
    """:func:`~em_circuits.analysis.causal.causal_validation`, the prompts shared among the
    processes."""
    from em_circuits.analysis.causal import dose_rows, dose_summary  # noqa: PLC0415  # heavy: loads torch

    seed, position = ctx.shared.seed, ctx.shared.position
    per_prompt = ctx.spread(
        name,
        prompts,
        lambda p: dose_rows(model(), p, top, scales, n_random, seed, position),
        cost=_prompt_cost,
        key=lambda p: json.dumps([p["prompt_id"], [list(f) for f in top]]),
    )
    return dose_summary(
        model(),
        prompts,
        per_prompt,
        top,
        scales,
        n_random,
        seed,
        position,
        clusters=ctx.split().clusters,
    )

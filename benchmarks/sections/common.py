"""What the sections share: the run's settings and context, the resident models, the analysis."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from harness import Budget, Estimates, Skip, free_memory, weights_gib
from workloads import Workload, workdir_name

from em_circuits.analysis.effects import prompt_effects
from em_circuits.attribution.storage import CompactGraph
from em_circuits.attribution.targets import AttributionParams
from em_circuits.core.store import ResultsStore
from em_circuits.models.load import LoadedModel, release

# How the report names the per-prompt analysis (kept as earlier reports worded it).
ANALYSIS_CALL = "em_circuits.analysis.effects.prompt_effects(graph, position='any')"


def analyse(graph: CompactGraph) -> Any:
    """The per-prompt feature analysis the pipeline runs on each stored graph."""
    return prompt_effects(graph, position="any")


def model_weights_gib(model: LoadedModel) -> float:
    """One model's weights with its transcoders."""
    return weights_gib(model.hf_model, model.replacement.transcoders)


@dataclass(frozen=True)
class Settings:
    """The options of this run, fixed before any section starts."""

    args: argparse.Namespace
    device: torch.device
    params: AttributionParams
    workdir: Path  # this workload's folder: its files, the results store, dense graphs

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        params = AttributionParams(
            mode=getattr(args, "graph_mode", "full"),
            max_feature_nodes=args.max_feature_nodes,
            batch_size=args.batch_size,
            edge_keep=args.edge_keep,
        )
        return cls(args, torch.device(args.device), params, Path(args.workdir) / workdir_name(args))


@dataclass(frozen=True)
class Context:
    """What every measuring section reads: the settings, the workload, its store, the budget
    and the time estimates (which sections refine as they measure)."""

    settings: Settings
    workload: Workload
    store: ResultsStore
    budget: Budget
    estimates: Estimates

    @property
    def args(self) -> argparse.Namespace:
        return self.settings.args

    @property
    def device(self) -> torch.device:
        return self.settings.device

    @property
    def params(self) -> AttributionParams:
        return self.settings.params

    @property
    def workdir(self) -> Path:
        return self.settings.workdir


class ResidentModels:
    """Base and adapted model loaded once on one transcoder set, for the sections that share
    them; released before the sections that load models of their own."""

    def __init__(self) -> None:
        self.models: dict[str, LoadedModel] = {}  # by role, in load order

    def add(self, role: str, model: LoadedModel) -> None:
        self.models[role] = model

    def pair(self) -> tuple[LoadedModel, LoadedModel]:
        if "base" not in self.models or "adapted" not in self.models:
            raise Skip("the resident models are not loaded")
        return self.models["base"], self.models["adapted"]

    def release(self) -> None:
        for role in list(self.models):
            release(self.models.pop(role))
        free_memory()

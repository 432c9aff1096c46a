"""What a step's run reads: the models, the graphs, the per-prompt effects, earlier steps' files.

The per-prompt effects are loaded on first use only, so a run whose graph-reading steps are
all up to date reads no graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from tqdm import tqdm

from em_circuits.analysis.cache import cached_prompt_effects
from em_circuits.analysis.decomposition import contrast_parts
from em_circuits.analysis.split import Split
from em_circuits.analysis.steps.base import SharedParams, StepSummary, read_table, write_table
from em_circuits.analysis.steps.spread import spread, work_folder
from em_circuits.attribution.stored_graphs import (
    GraphIntegrityError,
    find_graph_metas,
    load_graph,
)
from em_circuits.core.distributed import Shard
from em_circuits.core.schemas import GraphMetaRecord
from em_circuits.core.store import ResultsStore, read_json
from em_circuits.models.load import ResidentModels
from em_circuits.models.spec import ModelSpec

log = logging.getLogger(__name__)

ROLES = ("base", "adapted")
U = TypeVar("U")


def chosen_graphs(
    store: ResultsStore, slug: str, prompt_ids: Collection[str] | None = None
) -> list[GraphMetaRecord]:
    """The graphs of one model the analysis reads: every complete one, or those of
    ``prompt_ids``."""
    return [
        m
        for m in find_graph_metas(store, slug)
        if prompt_ids is None or m["prompt_id"] in prompt_ids
    ]


@dataclass
class Effects:
    """One model's per-prompt feature effects (cached on disk per prompt), the contrast's
    decomposition into parts, and the graphs' metadata, for the prompts with a contrast."""

    effects: dict[str, pd.DataFrame] = field(default_factory=dict)
    parts: dict[str, pd.DataFrame] = field(default_factory=dict)
    metas: dict[str, GraphMetaRecord] = field(default_factory=dict)


def load_effects(
    store: ResultsStore,
    slug: str,
    position: str,
    chosen: list[GraphMetaRecord],
    progress: bool = False,
    left_out: list[str] | None = None,
) -> Effects:
    """Per prompt: feature effects (cached), the contrast's decomposition into parts
    (:func:`~em_circuits.analysis.decomposition.contrast_parts`), and the graph's metadata.

    A graph whose file fails its integrity check is left out with a warning naming the file,
    and its prompt id appended to ``left_out``.
    """
    out = Effects()
    for meta in tqdm(chosen, desc=f"features {slug}", disable=not progress, unit="graph"):
        try:
            graph = load_graph(store, meta)
        except GraphIntegrityError as err:
            log.warning("left out of the analysis: %s", err)
            if left_out is not None:
                left_out.append(meta["prompt_id"])
            continue
        pid = meta["prompt_id"]
        if graph.contrast_index() is None:
            continue  # no evil-vs-safe contrast without both kinds of labels
        out.effects[pid] = cached_prompt_effects(
            store, graph, slug, pid, meta["model_fingerprint"], position=position
        )
        out.parts[pid] = contrast_parts(graph)
        out.metas[pid] = meta
    return out


@dataclass
class AnalysisContext:
    """One analysis run: where it writes, what it reads, the models it may load."""

    store: ResultsStore
    specs: dict[str, ModelSpec]
    fingerprints: dict[str, str]
    slugs: dict[str, str]
    device: str
    directory: Path
    graphs: dict[str, list[GraphMetaRecord]]
    shared: SharedParams
    prompt_ids: Collection[str] | None = None
    progress: bool = False
    models: ResidentModels | None = None
    em_judge: Any = None
    labeller: Any = None
    #: entries of summary.json the steps so far returned (a later step may read them)
    summary: StepSummary = field(default_factory=dict)
    #: this process's place in a launch (alone by default)
    shard: Shard = field(default_factory=lambda: Shard(0, 1, 0))
    #: the running step's name and key (set by the step runner)
    running: tuple[str, str] = ("", "")
    _effects: dict[str, Effects] | None = None
    _left_out: list[str] = field(default_factory=list)
    _written: list[str] = field(default_factory=list)
    _split: Split | None = None

    def effects(self, role: str) -> Effects:
        """Both models' per-prompt effects, loaded on first use."""
        if self._effects is None:
            self._effects = {
                r: load_effects(
                    self.store,
                    self.slugs[r],
                    self.shared.position,
                    self.graphs[r],
                    self.progress,
                    self._left_out,
                )
                for r in ROLES
            }
        return self._effects[role]

    @property
    def left_out(self) -> list[str]:
        """Prompts whose graphs failed their check (after :meth:`effects` ran)."""
        return sorted(self._left_out)

    def split(self) -> Split:
        """The discovery / validation split the split step wrote (read once per run)."""
        if self._split is None:
            self._split = Split.from_record(read_json(self.directory / "split.json"))
        return self._split

    def analysed(self, role: str) -> Effects:
        """One model's effects on the prompts the split keeps (both sides): the prompts
        every step after the split reads."""
        split = self.split()
        kept = set(split.discovery) | set(split.validation)
        every = self.effects(role)
        return Effects(
            {p: e for p, e in every.effects.items() if p in kept},
            {p: e for p, e in every.parts.items() if p in kept},
            {p: m for p, m in every.metas.items() if p in kept},
        )

    @property
    def is_main(self) -> bool:
        """Whether this process writes the step's files (a spread step runs on every one)."""
        return self.shard.is_main

    def spread(
        self,
        name: str,
        units: Sequence[U],
        compute: Callable[[U], Any],
        *,
        cost: Callable[[U], float],
        key: Callable[[U], str],
    ) -> list[Any]:
        """Every unit's result, in the order of ``units``, on every process, each unit
        computed by one process (:func:`~em_circuits.analysis.steps.spread.spread`); ``name``
        tells this step's spreads apart."""
        step, step_key = self.running
        folder = work_folder(self.directory, step, step_key, name)
        return spread(self.shard, folder, units, compute, cost=cost, key=key)

    def table(self, name: str) -> pd.DataFrame:
        return read_table(self.directory, name)

    def json(self, name: str) -> Any:
        return read_json(self.directory / name)

    def write_table(self, frame: pd.DataFrame, name: str) -> None:
        self._written += write_table(frame, self.directory, name)

    def wrote(self, *names: str) -> None:
        """Record files written in the folder another way (plots, JSON)."""
        self._written += names
        if "split.json" in names:
            self._split = None  # a new split: the next read sees it

    def take_written(self) -> list[str]:
        written, self._written = self._written, []
        return written

    @contextmanager
    def model_pool(self) -> Iterator[ResidentModels]:
        """The run's loaded models, or a pool released when the step is done."""
        if self.models is not None:
            yield self.models
            return
        pool = ResidentModels(None, self.device, self.store.merged_cache_dir)
        try:
            yield pool
        finally:
            pool.release()

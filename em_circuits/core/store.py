"""The results store: one documented layout, atomic writes, validated reads.

Every stage reads and writes through this module, so the layout lives in one place: no other
module joins a path under the results root or lists one of its folders.
Layout under the results root (``results/`` by default)::

    prompts/<prompt_id>.json                        prompt records (text, format, origin)
    logits/<model_slug>/<prompt_id>.json            top-k next-token logits of one model
    verdicts/<adapted_slug>/<prompt_id>.json        judge labels + divergence for a prompt
    judge_cache/<key>.json                          raw judge replies, keyed by their inputs
    queue/<adapted_slug>/<prompt_id>.json           manual labeling queue items (with state)
    labels/<adapted_slug>/<prompt_id>.json          final labels (human or judge-accepted)
    labels/<adapted_slug>/calibration.json          judge-vs-human agreement (a table)
    queue/ and labels/<adapted_slug>/stale/         items and labels of an older model version
    graphs/<model_slug>/<prompt_id>/<params>.*      compact attribution graphs (+ meta JSON)
    viewer/<adapted_slug>/                          graphs in the browser viewer's format
    features/<model_slug>/<prompt_id>/<params>.json per-prompt feature effects (analysis cache)
    analysis/<adapted_slug>/                        cross-prompt tables, plots, causal checks
    transcoder_quality/<model_slug>/<params>.json   how well the transcoders replace the MLPs
    cache/merged/<adapted_slug>/                    merged adapter weights, built once
    cache/em_judge/<key>.json                       LLM judge scores of the EM rate
    cache/feature_labels/<key>.json                 LLM labels of the feature cards
    features_index/<model_slug>/                    activation index of the corpus
    report.md, report.json                          the end-of-run report

``model_slug`` is ``<readable-name>--<fingerprint[:12]>``, so a person can find a model's files
by name while two different models (or two versions of one adapter) never share a directory.

Each JSON file is an artifact of :mod:`em_circuits.core.artifacts`, read and written through it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

# ArtifactError, read_artifact, read_json and write_artifact are imported from here by most
# stages (the store is where IO lives); they are defined in em_circuits.core.artifacts.
from em_circuits.core.artifacts import (
    ArtifactError,
    fix_for,
    read_artifact,
    read_json,
    write_artifact,
)
from em_circuits.core.claims import CLAIM_SUFFIX
from em_circuits.core.identifiers import prompt_id
from em_circuits.core.schemas import GraphMetaRecord, PromptRecord


class MissingResultsDirError(ArtifactError):
    """A command that only reads results was pointed at a folder that does not exist."""


def require_results_dir(path: Path | str) -> Path:
    """The results root of a command that only reads (report, inspect, serve, export, features,
    the status views), which must exist already: a mistyped --results-dir would otherwise be
    created and read as an empty store. Raises MissingResultsDirError; creates nothing."""
    root = Path(path)
    if root.is_dir():
        return root
    problem = "not a directory" if root.exists() else "no such results directory"
    raise MissingResultsDirError(
        root,
        f"--results-dir: {problem}",
        "give the folder an earlier run wrote, by default results/, or run `em-circuits run` "
        "first; this command only reads and creates nothing",
    )


class ResultsStore:
    """Every path and every listing under one results root, and typed reads/writes."""

    def __init__(self, root: Path | str = "results"):
        self.root = Path(root)

    # -- paths -----------------------------------------------------------------------------
    @property
    def prompts_dir(self) -> Path:
        return self.root / "prompts"

    def prompt_path(self, pid: str) -> Path:
        return self.prompts_dir / f"{pid}.json"

    def logits_dir(self, model_slug: str) -> Path:
        return self.root / "logits" / model_slug

    def logits_path(self, model_slug: str, pid: str) -> Path:
        return self.logits_dir(model_slug) / f"{pid}.json"

    def verdicts_dir(self, adapted_slug: str) -> Path:
        return self.root / "verdicts" / adapted_slug

    def verdict_path(self, adapted_slug: str, pid: str) -> Path:
        return self.verdicts_dir(adapted_slug) / f"{pid}.json"

    @property
    def judge_cache_dir(self) -> Path:
        """The LLM judge's replies (labeling.llm_judge), one file per cache key."""
        return self.root / "judge_cache"

    def queue_dir(self, adapted_slug: str) -> Path:
        return self.root / "queue" / adapted_slug

    def queue_path(self, adapted_slug: str, pid: str) -> Path:
        return self.queue_dir(adapted_slug) / f"{pid}.json"

    def labels_dir(self, adapted_slug: str) -> Path:
        return self.root / "labels" / adapted_slug

    def labels_path(self, adapted_slug: str, pid: str) -> Path:
        return self.labels_dir(adapted_slug) / f"{pid}.json"

    def calibration_path(self, adapted_slug: str) -> Path:
        return self.labels_dir(adapted_slug) / _CALIBRATION

    @staticmethod
    def stale_path(path: Path, fingerprint: str) -> Path:
        """Where an artifact made for another model version is moved (never overwritten)."""
        return path.parent / "stale" / f"{path.stem}--{fingerprint[:12]}.json"

    def graphs_dir(self, model_slug: str) -> Path:
        return self.root / "graphs" / model_slug

    def graph_dir(self, model_slug: str, pid: str) -> Path:
        return self.graphs_dir(model_slug) / pid

    def graph_paths(self, model_slug: str, pid: str, key: str) -> dict[str, Path]:
        """The compact graph, its meta artifact and the optional full graph of one params key."""
        directory = self.graph_dir(model_slug, pid)
        return {
            "compact": directory / f"{key}.safetensors",
            "meta": directory / f"{key}.json",
            "full": directory / f"{key}.full.safetensors",
        }

    def graph_claim_path(self, model_slug: str, pid: str, key: str) -> Path:
        """The claim a process holds while it computes one graph (:mod:`em_circuits.core.claims`);
        hidden, so listings and :meth:`graph_family` never see it."""
        return self.graph_dir(model_slug, pid) / f".{key}{CLAIM_SUFFIX}"

    def compact_graph_path(self, meta: GraphMetaRecord) -> Path:
        """The compact graph file a meta artifact describes."""
        return self.graph_dir(meta["model_slug"], meta["prompt_id"]) / meta["files"]["compact"]

    @staticmethod
    def graph_meta_path_for(graph_file: Path) -> Path:
        """The meta artifact next to a compact or full graph file."""
        stem = graph_file.name.removesuffix(".full.safetensors").removesuffix(".safetensors")
        return graph_file.with_name(f"{stem}.json")

    @staticmethod
    def graph_family(graph_file: Path) -> list[Path]:
        """A graph file and its siblings of the same params key (compact, full, meta)."""
        stem = graph_file.name.split(".")[0]
        return sorted(graph_file.parent.glob(f"{stem}*"))

    def features_path(self, model_slug: str, pid: str, params_key: str) -> Path:
        return self.root / "features" / model_slug / pid / f"{params_key}.json"

    def viewer_dir(self, adapted_slug: str) -> Path:
        return self.root / "viewer" / adapted_slug

    def features_index_dir(self, model_slug: str) -> Path:
        """A model's activation index of its corpus (interpret.activation_index)."""
        return self.root / "features_index" / model_slug

    def transcoder_quality_path(self, model_slug: str, key: str) -> Path:
        """A model's transcoder quality on held-out text (transcoders.quality), one
        file per corpus and parameters."""
        return self.root / "transcoder_quality" / model_slug / f"{key}.json"

    def trained_transcoders_dir(self, name: str) -> Path:
        """A transcoder set trained here (transcoders.training): circuit-tracer's
        config.yaml and layer files, the sparsify checkpoint and training.json."""
        return self.root / "transcoders" / name

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    def model_analysis_dir(self, adapted_slug: str) -> Path:
        return self.analysis_dir / adapted_slug

    def analysis_run_dir(self, adapted_slug: str, name: str) -> Path:
        """One analysis's folder (``main`` unless named): each step's files, ``steps.json``
        and ``summary.json``; an analysis of another name keeps its own."""
        return self.model_analysis_dir(adapted_slug) / "runs" / name

    def latest_analysis_path(self, adapted_slug: str) -> Path:
        """``latest.json``: which run folder the last analysis wrote, with its parameters."""
        return self.model_analysis_dir(adapted_slug) / "latest.json"

    def latest_analysis_dir(self, adapted_slug: str) -> Path:
        """The folder of the last analysis run (what the report and notebooks read)."""
        pointer = self.latest_analysis_path(adapted_slug)
        if pointer.is_file():
            return self.root / read_json(pointer, "table")["folder"]
        return self.model_analysis_dir(adapted_slug)

    @property
    def merged_cache_dir(self) -> Path:
        return self.root / "cache" / "merged"

    @property
    def em_judge_cache_dir(self) -> Path:
        """The LLM EM judge's scores (analysis.em_rate), one file per cache key."""
        return self.root / "cache" / "em_judge"

    @property
    def feature_labels_cache_dir(self) -> Path:
        """The LLM labels of feature cards (interpret.labels), one file per cache key."""
        return self.root / "cache" / "feature_labels"

    def merged_models(self) -> list[Path]:
        """The merged adapters cached under this results directory (one folder per model)."""
        root = self.merged_cache_dir
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def artifacts_of(self, model_slug: str) -> int:
        """How many logits and graph files of this model the results directory holds."""
        logits = self.logits_dir(model_slug)
        n_logits = len(list(logits.glob("*.json"))) if logits.is_dir() else 0
        graphs = self.graphs_dir(model_slug)
        n_graphs = len(list(graphs.glob("*/*.json"))) if graphs.is_dir() else 0
        return n_logits + n_graphs

    @property
    def report_json_path(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md_path(self) -> Path:
        return self.root / "report.md"

    # -- listings --------------------------------------------------------------------------
    @staticmethod
    def _per_prompt(folder: Path, pattern: str = "*.json") -> list[Path]:
        # The calibration table shares labels/<slug>/ but is not a per-prompt artifact; stale/
        # is one level deeper and never matched.
        return sorted(p for p in folder.glob(pattern) if p.name != _CALIBRATION)

    def logits_paths(self, model_slug: str) -> list[Path]:
        return self._per_prompt(self.logits_dir(model_slug))

    def written_since(self, since: float) -> int:
        """How many logits and verdict files (any model's) were written at or after ``since``
        (a ``time.time()`` value): whether a stage that stopped had finished anything."""
        paths = [*self._per_prompt(self.root / "logits", "*/*.json"), *self.verdict_paths()]
        count = 0
        for path in paths:
            try:
                count += path.stat().st_mtime >= since
            except FileNotFoundError:
                continue  # moved aside meanwhile (stale/)
        return count

    def verdict_paths(self, adapted_slug: str | None = None) -> list[Path]:
        """One adapted model's verdicts, or (no slug) every model's, sorted by path."""
        if adapted_slug is None:
            return self._per_prompt(self.root / "verdicts", "*/*.json")
        return self._per_prompt(self.verdicts_dir(adapted_slug))

    @staticmethod
    def _subfolders(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def verdict_slugs(self) -> list[str]:
        """The adapted models that have verdicts."""
        return self._subfolders(self.root / "verdicts")

    def queue_paths(self, adapted_slug: str) -> list[Path]:
        return self._per_prompt(self.queue_dir(adapted_slug))

    def labels_paths(self, adapted_slug: str | None = None) -> list[Path]:
        """One adapted model's labels, or (no slug) every model's, sorted by path."""
        if adapted_slug is None:
            return self._per_prompt(self.root / "labels", "*/*.json")
        return self._per_prompt(self.labels_dir(adapted_slug))

    def graph_meta_paths(self, model_slug: str) -> list[Path]:
        """Every graph meta artifact of one model (complete or not), sorted by path."""
        return self._per_prompt(self.graphs_dir(model_slug), "*/*.json")

    def graph_files(self, pid: str) -> list[Path]:
        """Every model's compact and full graph files of one prompt."""
        return sorted((self.root / "graphs").glob(f"*/{pid}/*.safetensors"))

    def analysed_slugs(self) -> list[str]:
        """The adapted models that have an analysis folder."""
        return self._subfolders(self.analysis_dir)

    def analysis_files(self, adapted_slug: str, pattern: str = "*") -> list[Path]:
        """Files of the last analysis run of one model."""
        return sorted(self.latest_analysis_dir(adapted_slug).glob(pattern))

    def disk_usage(self) -> dict[str, int]:
        """Bytes per top-level folder."""
        return {
            child.name: sum(p.stat().st_size for p in child.rglob("*") if p.is_file())
            for child in sorted(self.root.iterdir())
            if child.is_dir()
        }

    # -- prompts -----------------------------------------------------------------------------
    def save_prompt(self, record: dict[str, Any]) -> PromptRecord:
        """Store a prompt record; its id is derived from text and format, never trusted."""
        pid = prompt_id(record["text"], record["format"])
        record = {**record, "prompt_id": pid}
        return write_artifact(self.prompt_path(pid), "prompt", record)

    def load_prompt(self, pid: str) -> PromptRecord:
        path = self.prompt_path(pid)
        data = read_artifact(path, "prompt")
        if prompt_id(data["text"], data["format"]) != pid:
            raise ArtifactError(
                path, "prompt_id does not match the hash of its text and format", fix_for("prompt")
            )
        return data

    def prompt_ids(self) -> list[str]:
        return sorted(p.stem for p in self.prompts_dir.glob("*.json"))

    def iter_prompts(self) -> Iterator[PromptRecord]:
        for pid in self.prompt_ids():
            yield self.load_prompt(pid)

    # -- fingerprinted artifacts ------------------------------------------------------------
    def load_for_model(self, path: Path, kind: str, fingerprint: str, **expected: Any) -> Any:
        """The ``kind`` record at ``path`` if it exists and was made by ``fingerprint``; else
        None (a cache miss).

        Extra keyword arguments must also match (e.g. ``params_key``), so a cached artifact
        computed with other parameters is a miss, never silently reused.
        """
        if not Path(path).exists():
            return None
        data = read_artifact(path, kind)
        if data.get("model_fingerprint") != fingerprint:
            return None
        for key, value in expected.items():
            if data.get(key) != value:
                return None
        return data


_CALIBRATION = "calibration.json"

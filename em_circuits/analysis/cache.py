"""The per-prompt feature-effects cache under features/, keyed by model, graph and parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from em_circuits.analysis.effects import ANALYSIS_VERSION, METRICS, parse_position, prompt_effects
from em_circuits.attribution.storage import CompactGraph, content_fingerprint
from em_circuits.core.schemas import FeatureEffectsRecord
from em_circuits.core.store import ResultsStore, params_key, read_artifact, write_artifact


def graph_fingerprint(graph: CompactGraph) -> str:
    """The graph's content fingerprint (what the per-prompt cache is keyed by)."""
    return content_fingerprint(graph)


def effects_params(position: str, metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """The parameters a per-prompt effects table depends on (the cache key)."""
    parse_position(position)
    return {"analysis_version": ANALYSIS_VERSION, "position": position, "metrics": list(metrics)}


def _json_value(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        # NaN is not JSON: null, read back as NaN. 7 significant digits = the float32 precision
        # of the graphs, and half the file size of full float64 reprs.
        return None if math.isnan(value) else float(f"{value:.7g}")
    if isinstance(value, np.integer):
        return int(value)
    return value


def _json_rows(frame: pd.DataFrame) -> list[list[Any]]:
    # Rows as lists under one "columns" header: dicts would repeat every column name per
    # feature and triple the file size (~8k features x 2 metrics per prompt).
    return [[_json_value(v) for v in row] for row in frame.itertuples(index=False, name=None)]


def write_prompt_effects(
    path: Path,
    effects: pd.DataFrame,
    prompt_id: str,
    model_fingerprint: str,
    graph_fingerprint: str,
    params: dict[str, Any],
) -> FeatureEffectsRecord:
    """Write a per-prompt effects table as a "feature_effects" artifact; returns the envelope.

    ``features`` holds one list per table row, in the order of ``columns``; read it back with
    :func:`read_prompt_effects`.
    """
    payload = {
        "prompt_id": prompt_id,
        "model_fingerprint": model_fingerprint,
        "graph_fingerprint": graph_fingerprint,
        "params": params,
        "params_key": params_key(params),
        "columns": list(effects.columns),
        "features": _json_rows(effects),
    }
    return write_artifact(path, "feature_effects", payload)


def read_prompt_effects(
    path: Path,
    model_fingerprint: str | None = None,
    graph_fingerprint: str | None = None,
    params: dict[str, Any] | None = None,
) -> pd.DataFrame | None:
    """Read a cached table; None when absent or made from another model, graph or params."""
    path = Path(path)
    if not path.exists():
        return None
    data = read_artifact(path, "feature_effects")
    expected = {
        "model_fingerprint": model_fingerprint,
        "graph_fingerprint": graph_fingerprint,
        "params": params,
    }
    if any(want is not None and data.get(key) != want for key, want in expected.items()):
        return None
    frame = pd.DataFrame.from_records(data["features"], columns=data.get("columns"))
    text = {"metric", "contrast_from"}
    numeric = [c for c in frame.columns if c not in text]
    return frame.astype({c: "float64" for c in numeric}).astype(
        {
            c: "int64"
            for c in ("layer", "feature", "position", "n_nodes", "n_evil", "n_safe")
            if c in frame.columns
        }
    )


def cached_prompt_effects(
    store: ResultsStore,
    graph: CompactGraph,
    model_slug: str,
    prompt_id: str,
    model_fingerprint: str,
    position: str = "any",
    metrics: Sequence[str] = METRICS,
    force: bool = False,
) -> pd.DataFrame:
    """:func:`prompt_effects` through the per-prompt cache under ``features/``."""
    params = effects_params(position, metrics)
    path = store.features_path(model_slug, prompt_id, params_key(params))
    fp = graph_fingerprint(graph)
    if not force:
        cached = read_prompt_effects(path, model_fingerprint, fp, params)
        if cached is not None:
            return cached
    effects = prompt_effects(graph, position, metrics)
    write_prompt_effects(path, effects, prompt_id, model_fingerprint, fp, params)
    # Use the stored (rounded) values either way, so a resumed run equals an uninterrupted one.
    return read_prompt_effects(path)

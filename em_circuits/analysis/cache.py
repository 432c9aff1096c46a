"""The per-prompt feature-effects cache under features/, keyed by model, graph and parameters."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors.numpy import load, save

from em_circuits.analysis.effects import ANALYSIS_VERSION, METRICS, parse_position, prompt_effects
from em_circuits.attribution.storage import CompactGraph, content_fingerprint
from em_circuits.core.atomic import atomic_write_bytes
from em_circuits.core.cache import cache_key
from em_circuits.core.schemas import FeatureEffectsRecord
from em_circuits.core.store import ResultsStore, read_artifact, write_artifact


def graph_fingerprint(graph: CompactGraph) -> str:
    """The graph's content fingerprint (what the per-prompt cache is keyed by)."""
    return content_fingerprint(graph)


def effects_params(position: str, metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """The parameters a per-prompt effects table depends on (the cache key)."""
    parse_position(position)
    return {"analysis_version": ANALYSIS_VERSION, "position": position, "metrics": list(metrics)}


def table_path(path: Path) -> Path:
    """The binary column table beside a per-prompt effects envelope (``<key>.json``)."""
    return Path(path).with_suffix(".safetensors")


def _encode_columns(frame: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, list[Any]]]:
    """Numeric columns as they are (float64 and int64: the stored values are the computed
    ones); text columns as integer codes into a list of their values (None for missing)."""
    arrays: dict[str, np.ndarray] = {}
    categories: dict[str, list[Any]] = {}
    for column in frame.columns:
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            kind = np.int64 if pd.api.types.is_integer_dtype(values) else np.float64
            arrays[column] = np.ascontiguousarray(values.to_numpy(dtype=kind))
        else:
            codes, uniques = pd.factorize(values, use_na_sentinel=True)
            arrays[column] = codes.astype(np.int32)
            categories[column] = [None if v is None else str(v) for v in uniques]
    return arrays, categories


def _decode_columns(
    arrays: dict[str, np.ndarray], columns: list[str], categories: dict[str, list[Any]]
) -> pd.DataFrame:
    data: dict[str, Any] = {}
    for column in columns:
        values = arrays[column]
        if column in categories:
            names = np.array([*categories[column], None], dtype=object)
            data[column] = names[values]  # code -1 (missing) picks the trailing None
        else:
            data[column] = values
    return pd.DataFrame(data, columns=columns)


def write_prompt_effects(
    path: Path,
    effects: pd.DataFrame,
    prompt_id: str,
    model_fingerprint: str,
    graph_fingerprint: str,
    params: dict[str, Any],
) -> FeatureEffectsRecord:
    """Write a per-prompt effects table; returns the envelope.

    The table (every active feature of a totals graph: tens of thousands of rows) goes to a
    safetensors file of columns, written first; the JSON envelope beside it names it with its
    sha256, so a reader never pairs an envelope with a table it was not written with. Read it
    back with :func:`read_prompt_effects`.
    """
    arrays, categories = _encode_columns(effects)
    blob = save(arrays) if arrays else save({"_empty": np.zeros(0, dtype=np.int8)})
    table = table_path(path)
    table.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(table, blob)
    payload = {
        "prompt_id": prompt_id,
        "model_fingerprint": model_fingerprint,
        "graph_fingerprint": graph_fingerprint,
        "params": params,
        "params_key": cache_key(params),
        "columns": list(effects.columns),
        "categories": categories,
        "rows": len(effects),
        "table": {"file": table.name, "sha256": hashlib.sha256(blob).hexdigest()},
    }
    return write_artifact(path, "feature_effects", payload)


def read_prompt_effects(
    path: Path,
    model_fingerprint: str | None = None,
    graph_fingerprint: str | None = None,
    params: dict[str, Any] | None = None,
) -> pd.DataFrame | None:
    """Read a cached table; None when absent, made from another model, graph or params, or
    when its column table is missing or not the one the envelope names (then it is redone)."""
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
    table = path.parent / data["table"]["file"]
    try:
        blob = table.read_bytes()
    except FileNotFoundError:
        return None
    if hashlib.sha256(blob).hexdigest() != data["table"]["sha256"]:
        return None
    return _decode_columns(load(blob), data["columns"], data.get("categories", {}))


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
    path = store.features_path(model_slug, prompt_id, cache_key(params))
    fp = graph_fingerprint(graph)
    if not force:
        cached = read_prompt_effects(path, model_fingerprint, fp, params)
        if cached is not None:
            return cached
    effects = prompt_effects(graph, position, metrics)
    write_prompt_effects(path, effects, prompt_id, model_fingerprint, fp, params)
    return effects

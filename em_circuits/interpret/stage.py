"""Interpretation on demand: feature cards for any (layer, feature), outside an analysis run.

The analysis makes cards for the features it ranks (:mod:`em_circuits.interpret.card_step`);
this serves ``em-circuits features``: the same cards from the same cached
activation indexes for features a user names, and the viewer's feature records refreshed for
whatever graphs the viewer holds now.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from em_circuits.analysis.steps.context import chosen_graphs, load_effects
from em_circuits.core.store import ResultsStore, read_json
from em_circuits.interpret.activation_index import IndexParams
from em_circuits.interpret.card_step import viewer_summary
from em_circuits.interpret.cards import cached_index, feature_cards
from em_circuits.interpret.frontend import publish_to_viewer
from em_circuits.models.corpus import choose_corpus
from em_circuits.models.hooks import transcoder_set
from em_circuits.models.load import ResidentModels, n_layers_of
from em_circuits.models.spec import ModelSpec


def cards_on_demand(
    store: ResultsStore,
    specs: Mapping[str, ModelSpec],
    features: Sequence[tuple[int, int]],
    corpus: str | None,
    corpus_docs: int,
    device: str,
    viewer: bool = False,
) -> list[dict[str, Any]]:
    """Cards of ``features`` for the base and the adapted model (``specs`` by role), with
    their pivotal-prompt statistics from stored graphs when there are any; with ``viewer``,
    the viewer's feature records of every drawn feature are written as well."""
    chosen = choose_corpus(specs["adapted"], corpus, corpus_docs)
    if chosen is None:
        raise ValueError("no corpus for the activation index: give --corpus FILE")
    texts, corpus_name = chosen
    params = IndexParams()
    pool = ResidentModels(None, device, store.merged_cache_dir)
    try:
        loaded = {role: pool.load(spec) for role, spec in specs.items()}
        _check_features(loaded["adapted"], features)
        indexes = {
            role: cached_index(model, texts, store.features_index_dir(model.slug), params)
            for role, model in loaded.items()
        }
        # The pivotal prompts' effects (read from every stored graph) only for named cards.
        effects = {
            role: load_effects(store, model.slug, "any", graphs).effects
            if features and (graphs := chosen_graphs(store, model.slug, None))
            else {}
            for role, model in loaded.items()
        }
        # No labeller here: a card's label comes from an analysis run's labeller.
        cards = feature_cards(list(features), loaded, indexes, effects, params)
        if viewer:
            viewer_dir = store.viewer_dir(loaded["adapted"].slug)
            if not (viewer_dir / "graph-metadata.json").is_file():
                raise FileNotFoundError(
                    f"{viewer_dir}: no viewer graphs yet; run `em-circuits graphs` first"
                )
            analysis = _viewer_analysis(store, loaded["adapted"].slug)
            labels = [
                {"layer": f["layer"], "feature": f["feature"], "label": f.get("label")}
                for f in analysis.get("top_features", [])
            ]
            publish_to_viewer(viewer_dir, loaded, indexes, params, corpus_name, labels, analysis)
    finally:
        pool.release()
    return cards


def _viewer_analysis(store: ResultsStore, adapted_slug: str) -> dict[str, Any]:
    """What the viewer shows of the last analysis: its ``analysis.json`` when the analysis
    wrote one, else made from the last analysis's tables (results from before the viewer
    had one), else nothing."""
    written = store.viewer_dir(adapted_slug) / "analysis.json"
    if written.is_file():
        return dict(json.loads(written.read_text()))
    folder = store.latest_analysis_dir(adapted_slug)
    tables = {
        name: pd.read_csv(folder / f"{name}.csv")
        for name in ("top_features_adapted", "base_vs_adapted")
        if (folder / f"{name}.csv").is_file() and (folder / f"{name}.csv").stat().st_size > 1
    }
    if "top_features_adapted" not in tables or not (folder / "summary.json").is_file():
        return {}
    return viewer_summary(store, folder, read_json(folder / "summary.json", "table"), tables)


def _check_features(model: Any, features: Sequence[tuple[int, int]]) -> None:
    n_layers = n_layers_of(model)
    width = int(transcoder_set(model).d_transcoder)
    for layer, feature in features:
        if not (0 <= layer < n_layers and 0 <= feature < width):
            raise ValueError(
                f"feature {layer}:{feature} does not exist: layers 0-{n_layers - 1}, "
                f"features 0-{width - 1} per layer"
            )

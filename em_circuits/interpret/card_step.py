"""Step: what the top features mean: a card per feature (contexts, logit lens, statistics).

Cards for the features under causal test, then the top by discovery mean, and the features
that carry most of the adapter nodes' effect (:mod:`em_circuits.interpret.cards`), from each
model's activation index of the corpus (built once per model, corpus and parameters, under
``features_index/``); labelled when an LLM labeller is given. The viewer's feature panel gets
a record of every feature its graphs draw. Writes ``feature_cards.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult
from em_circuits.core.markdown import feature_link
from em_circuits.core.naming import feature_name
from em_circuits.core.options import option
from em_circuits.core.report_data import Report, ReportPart, StoredJson
from em_circuits.core.store import ResultsStore, write_artifact
from em_circuits.models.corpus import choose_corpus
from em_circuits.models.spec import ModelSpec

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext
    from em_circuits.models.load import ResidentModels

#: How many of the features carrying the adapter nodes' effect get feature cards.
ADAPTER_CARDS = 3


@dataclass(frozen=True)
class CardParams:
    card_features: int = option(
        10,
        "features that get a card: top contexts, logit lens, pivotal-prompt statistics (0 = none)",
    )


def run_feature_cards(
    store: ResultsStore,
    specs: dict[str, ModelSpec],
    directory: Path,
    features: list[tuple[int, int]],
    effects: dict[str, dict[str, pd.DataFrame]],
    corpus_file: str | None,
    corpus_docs: int,
    device: str,
    models: ResidentModels | None = None,
    labeller: Any = None,
    viewer: tuple[Path, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Cards for ``features`` (:mod:`em_circuits.interpret.cards`), from each model's
    activation index of the corpus (built once per model, corpus and parameters, under
    ``features_index/``) and the pivotal prompts' effects; labelled when ``labeller``
    (:class:`~em_circuits.interpret.labels.FeatureLabeller`) is given. With ``viewer``
    (its folder and the analysis's summary for it), the viewer's feature panel gets a record
    of every feature its graphs draw (:func:`em_circuits.interpret.frontend.publish_to_viewer`).
    """
    from em_circuits.interpret.activation_index import IndexParams  # noqa: PLC0415  # heavy: loads torch, circuit-tracer
    from em_circuits.interpret.cards import cached_index, feature_cards  # noqa: PLC0415  # heavy: loads torch, circuit-tracer
    from em_circuits.interpret.frontend import publish_to_viewer  # noqa: PLC0415  # heavy: loads torch, circuit-tracer
    from em_circuits.models.load import ResidentModels  # noqa: PLC0415  # heavy: loads torch

    chosen = choose_corpus(specs["adapted"], corpus_file, corpus_docs)
    if chosen is None:
        return {"skipped": "no corpus for the activation index: give --corpus FILE"}
    texts, corpus = chosen
    index_params = IndexParams()
    pool = models or ResidentModels(None, device, store.merged_cache_dir)
    try:
        loaded = {role: pool.load(spec) for role, spec in specs.items()}
        indexes = {
            role: cached_index(model, texts, store.features_index_dir(model.slug), index_params)
            for role, model in loaded.items()
        }
        cards = feature_cards(features, loaded, indexes, effects, index_params)
        for card in cards:
            card["label"] = labeller.label(card) if labeller is not None else None
        if viewer is not None:
            viewer_dir, analysis = viewer
            publish_to_viewer(viewer_dir, loaded, indexes, index_params, corpus, cards, analysis)
    finally:
        if models is None:
            pool.release()
    payload = {
        "corpus": corpus,
        "n_documents": len(texts),
        "labeller": None if labeller is None else labeller.id,
        "cards": cards,
    }
    write_artifact(directory / "feature_cards.json", "table", payload)
    return {"corpus": corpus, "n_documents": len(texts), "features": len(cards)}


def viewer_summary(
    store: ResultsStore, directory: Path, summary: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> dict[str, Any]:
    """What the side-by-side viewer shows of this analysis: the top features by discovery
    mean total effect (those under causal test marked) and every compared feature's
    base-vs-adapted category."""
    tested = {
        tuple(map(int, t))
        for t in ((summary.get("causal") or {}).get("ranking") or {}).get("chosen", [])
    }
    comparison = tables.get("base_vs_adapted", pd.DataFrame())
    categories: dict[str, dict[str, Any]] = {}
    if len(comparison):
        for row in comparison[comparison["metric"] == "total"].itertuples():
            categories[f"{int(row.layer)}:{int(row.feature)}"] = {
                "category": str(row.category),
                "mean_base": float(row.mean_base),
                "mean_adapted": float(row.mean_adapted),
            }
    top = tables["top_features_adapted"]
    top = top[top["metric"] == "total"].sort_values("mean", ascending=False).head(30)
    features = []
    for rank, row in enumerate(top.itertuples(), 1):
        key = f"{int(row.layer)}:{int(row.feature)}"
        features.append(
            {
                "layer": int(row.layer),
                "feature": int(row.feature),
                "name": feature_name(row.layer, row.feature),
                "rank": rank,
                "mean_total": float(row.mean),
                "n_prompts": int(row.n_prompts),
                "tested": (int(row.layer), int(row.feature)) in tested,
                "category": categories.get(key, {}).get("category"),
            }
        )
    return {
        "analysis_folder": directory.relative_to(store.root).as_posix(),
        "top_features": features,
        "top_features_of": int((tables["top_features_adapted"]["metric"] == "total").sum()),
        "categories": categories,
    }


def cards_markdown(cards: StoredJson | None) -> list[str]:
    """The feature cards' section (of feature_cards.json): one card per feature, its name
    linked into the viewer."""
    from em_circuits.interpret.cards import card_markdown  # noqa: PLC0415  # heavy: transformers

    out: list[str] = []
    if cards and cards.get("cards"):
        out += [
            "## What the top features mean (feature cards)\n",
            f"Top activating contexts in {cards['corpus']} ({cards['n_documents']} "
            "documents), activation frequency, logit lens (the output tokens the feature's "
            "decoder promotes and suppresses through the unembedding), and where it fires "
            "across the pivotal prompts. "
            + (
                f"Labels by {cards['labeller']} from the contexts and the logit lens.\n"
                if cards.get("labeller")
                else "No label is given without an LLM labeller (the LLM judge's model).\n"
            ),
        ]
        # The card's name is its heading: linked, it opens the viewer on that feature.
        out += [
            card_markdown({**card, "name": feature_link(card["layer"], card["feature"])})
            for card in cards["cards"]
        ]
    return out


def card_features_of(
    summary: Mapping[str, Any], ranked: pd.DataFrame, carriers: pd.DataFrame, n: int
) -> list[tuple[int, int]]:
    """The features that get cards: :func:`top_card_features`, then the top carriers of the
    adapter nodes' effect."""
    from em_circuits.interpret.cards import top_card_features  # noqa: PLC0415  # heavy: loads torch, circuit-tracer

    chosen = top_card_features(summary, ranked, n)
    if len(carriers):
        for key in zip(carriers["layer"][:ADAPTER_CARDS], carriers["feature"][:ADAPTER_CARDS]):
            if tuple(map(int, key)) not in chosen:
                chosen.append(tuple(map(int, key)))
    return chosen


@dataclass(frozen=True)
class FeatureCardsReport(ReportPart):
    #: feature_cards.json (None when no card was made)
    feature_cards: StoredJson | None = None


class FeatureCardsStep(Step):
    name = "feature_cards"
    Params = CardParams
    Part = FeatureCardsReport
    shared = ("corpus", "corpus_docs")
    reads = ("ranking", "base_vs_adapted", "adapter_nodes", "causal")
    uses = frozenset({"graphs", "models", "labeller"})
    # Not spread: the activation index reads --corpus-docs documents once per model (400 by
    # default, seconds on a GPU: README "Many prompts") and is kept under features_index/.

    def run(self, ctx: AnalysisContext, params: CardParams) -> StepResult:
        ranked = ctx.table("top_features_adapted")
        if params.card_features <= 0 or not len(ranked):
            return StepResult()
        chosen = card_features_of(
            ctx.summary, ranked, ctx.table("adapter_features"), params.card_features
        )
        viewer_dir = ctx.store.viewer_dir(ctx.slugs["adapted"])
        tables = {"top_features_adapted": ranked, "base_vs_adapted": ctx.table("base_vs_adapted")}
        viewer = (
            (viewer_dir, viewer_summary(ctx.store, ctx.directory, ctx.summary, tables))
            if ctx.prompt_ids is None and (viewer_dir / "graph-metadata.json").is_file()
            else None
        )
        note = run_feature_cards(
            ctx.store,
            ctx.specs,
            ctx.directory,
            chosen,
            {role: ctx.analysed(role).effects for role in ("base", "adapted")},
            ctx.shared.corpus,
            ctx.shared.corpus_docs,
            ctx.device,
            ctx.models,
            ctx.labeller,
            viewer,
        )
        if "skipped" not in note:
            ctx.wrote("feature_cards.json")
        return StepResult(summary={"feature_cards": note})

    def report_data(self, inputs: ReportInputs) -> FeatureCardsReport:
        return FeatureCardsReport(feature_cards=inputs.json("feature_cards.json"))

    def section(self, report: Report, analysis_rel: str) -> list[str]:
        return cards_markdown(report.part(FeatureCardsReport).feature_cards)


STEP = FeatureCardsStep()

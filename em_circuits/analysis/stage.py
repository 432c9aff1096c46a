"""The feature-analysis stage: from stored graphs to tables, plots and the causal check.

Reads the compact graphs of both models, computes per-prompt feature effects (cached), ranks
features across prompts, compares base and adapted on the prompts both have, decomposes the
contrast into features / error nodes / tokens per layer, intervenes on the top evil features
in the adapted model against matched random controls, measures how well the transcoders
replace each model's MLPs on held-out text, and writes everything to
``analysis/<adapted_slug>/`` as CSV + JSON tables and PNG plots.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd

from em_circuits.analysis.aggregate import aggregate_effects
from em_circuits.analysis.cache import cached_prompt_effects
from em_circuits.analysis.compare import compare_models
from em_circuits.analysis.decomposition import contrast_parts, summarize_decomposition
from em_circuits.analysis.plots import (
    plot_base_vs_adapted,
    plot_decomposition,
    plot_dose_response,
    plot_top_features,
)
from em_circuits.analysis.split import Split, prompt_clusters, split_by_cluster
from em_circuits.attribution.stage import GraphIntegrityError, find_graph_metas, load_graph
from em_circuits.core.schemas import GraphMetaRecord
from em_circuits.core.store import (
    ArtifactError,
    ResultsStore,
    atomic_write_text,
    params_key,
    read_json,
    write_artifact,
)
from em_circuits.models.load import ResidentModels
from em_circuits.models.spec import ModelSpec, fingerprint, model_slug

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisParams:
    position: str = "any"
    min_support: int = 2
    absent: str = "zero"
    n_boot: int = 2000
    n_perm: int = 9999
    compare_threshold: float = 0.05
    causal_top_k: int = 5
    scales: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
    n_random: int = 3
    causal_prompts: int = 20
    #: Features by linearised effect whose measured effects choose the causal_top_k.
    causal_candidates: int = 20
    seed: int = 0
    #: Share of the prompts (whole clusters) held out of the ranking for the causal tests.
    validation_fraction: float = 0.5
    #: Free-form answers per evaluation question and condition for the EM rate (0: skip).
    em_samples: int = 10
    em_max_new_tokens: int = 48
    #: "auto" (the organism's held-out out-of-domain scenarios when the adapter is a toy
    #: organism, else the first-plot questions), "organism" or "first-plot".
    em_questions: str = "auto"
    #: Features that get a card (contexts, logit lens, pivotal-prompt statistics; 0: none).
    card_features: int = 10
    #: The corpus of the activation index: a text or JSONL file; None: the toy organism's
    #: own documents (other models get no cards without one).
    corpus: str | None = None
    #: Documents read from the corpus (the toy organism's: generated; a file's: the first).
    corpus_docs: int = 400
    #: Held-out documents the transcoders' quality is measured on, for base and adapted
    #: (the toy organism's held-out split, or the corpus file's documents after the first
    #: corpus_docs; 0: not measured).
    quality_docs: int = 64


class _StatsKwargs(TypedDict):
    """The statistics options aggregate_effects and compare_models share."""

    min_support: int
    n_boot: int
    n_perm: int
    seed: int


def _write_table(frame: pd.DataFrame, directory: Path, name: str) -> None:
    """CSV for pandas/spreadsheets and JSON records for scripts, both written atomically.
    A table of features leads with their one name (``L3 #1234``), as report and viewer."""
    features = ["layer", "feature"]
    if (
        set(features) <= set(frame.columns)
        and "name" not in frame.columns
        and frame[features].notna().all().all()
    ):
        from em_circuits.interpret.cards import feature_name

        names = [feature_name(lay, f) for lay, f in zip(frame["layer"], frame["feature"])]
        frame = frame.assign(name=names)[["name", *frame.columns]]
    atomic_write_text(directory / f"{name}.csv", frame.to_csv(index=False))
    atomic_write_text(
        directory / f"{name}.json", frame.to_json(orient="records", indent=1, double_precision=6)
    )


def load_effects(
    store: ResultsStore,
    slug: str,
    position: str,
    progress: bool = False,
    prompt_ids: Collection[str] | None = None,
    chosen: list[GraphMetaRecord] | None = None,
    left_out: list[str] | None = None,
) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame], dict[str, dict[str, Any]]]:
    """Per prompt: feature effects (cached), the contrast's decomposition into parts
    (:func:`~em_circuits.analysis.decomposition.contrast_parts`), and the graph's metadata.

    ``chosen`` (the graphs :func:`chosen_graphs` picks) saves listing them again. A graph
    whose file fails its integrity check is left out with a warning naming the file, and its
    prompt id appended to ``left_out``.
    """
    from tqdm import tqdm

    effects, shares, metas = {}, {}, {}
    if chosen is None:
        chosen = chosen_graphs(store, slug, prompt_ids)
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
        effects[pid] = cached_prompt_effects(
            store, graph, slug, pid, meta["model_fingerprint"], position=position
        )
        shares[pid] = contrast_parts(graph)
        metas[pid] = meta
    return effects, shares, metas


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


def analysis_inputs_key(
    params: AnalysisParams, fingerprints: dict[str, str], graphs: dict[str, list[GraphMetaRecord]]
) -> str:
    """A hash of everything the tables are computed from: the models, the analysis parameters
    and, per graph, its prompt, model and parameters key (which covers the labeled targets).

    Graphs are identified by what they were computed from, not by their bytes: a graph
    computed again from the same inputs is the same graph, while its float bytes (and so any
    content hash) vary with the machine's thread count.
    """
    from em_circuits.analysis.effects import ANALYSIS_VERSION

    return params_key(
        {
            "analysis_version": ANALYSIS_VERSION,
            "params": asdict(params),
            "models": fingerprints,
            "graphs": {
                role: sorted(
                    (m["prompt_id"], m["model_fingerprint"], m["params_key"]) for m in metas
                )
                for role, metas in graphs.items()
            },
        }
    )


def _up_to_date(directory: Path, inputs_key: str) -> dict[str, Any] | None:
    """The stored summary when it was made from these inputs and every file it names exists."""
    path = directory / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = read_json(path, "table")
    except ArtifactError:
        return None
    if not isinstance(summary, dict) or summary.get("inputs_key") != inputs_key:
        return None
    names = [*summary.get("tables", [])]
    names += [Path(name).with_suffix(".json").name for name in summary.get("tables", [])]
    if "causal" in summary:
        names += ["causal_summary.json", "dose_response.csv", "measured_effects.csv"]
    if "cache_key" in (summary.get("em_rate") or {}):
        names += ["em_rate.json", "em_answers.csv"]
    if not all((directory / name).is_file() for name in names):
        return None
    return summary


def _cached_summary(path: Path, companion: Path, key: str) -> dict[str, Any] | None:
    """A stored summary made with this cache key whose table beside it exists, else None."""
    if path.is_file() and companion.is_file():
        cached = read_json(path)
        if cached.get("cache_key") == key:
            return cached
    return None


def _causal_prompts(store: ResultsStore, metas: dict[str, dict[str, Any]]) -> list[dict]:
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


def _point_latest(store: ResultsStore, slug: str, directory: Path, params: AnalysisParams) -> None:
    """latest.json -> this run's folder (unless it already points there)."""
    folder = directory.relative_to(store.root).as_posix()
    path = store.latest_analysis_path(slug)
    if path.is_file() and read_json(path, "table").get("folder") == folder:
        return  # a run with nothing new to do writes nothing (read-only results work)
    write_artifact(path, "table", {"folder": folder, "params": asdict(params)})


def _write_split(directory: Path, split: Split) -> None:
    """split.json: each prompt's side and cluster, for readers and for checking the split."""
    rows = [
        {"prompt_id": pid, "side": side, "cluster": split.clusters[pid]}
        for side in ("discovery", "validation")
        for pid in getattr(split, side)
    ]
    write_artifact(directory / "split.json", "table", {**split.describe(), "prompts": rows})


def replicate_on(ranked: pd.DataFrame, held_out: pd.DataFrame, top: int = 50) -> pd.DataFrame:
    """The ``top`` discovery features of each metric (by mean) with their statistics on the
    held-out prompts beside them: does the linearised effect replicate on prompts that did
    not select it?"""
    keys = [c for c in ("layer", "feature", "position") if c in ranked.columns]
    chosen = ranked.sort_values("mean", ascending=False).groupby("metric").head(top)
    columns = ["mean", "ci_low", "ci_high", "n_prompts", "n_clusters", "p_value", "p_method"]
    left = chosen[[*keys, "metric", *columns]].rename(
        columns={c: f"discovery_{c}" for c in columns}
    )
    right = held_out[[*keys, "metric", *columns]].rename(
        columns={c: f"validation_{c}" for c in columns}
    )
    out = left.merge(right, on=[*keys, "metric"], how="left")
    out["same_sign"] = np.sign(out["discovery_mean"]) == np.sign(out["validation_mean"])
    return out.reset_index(drop=True)


def run_causal(
    store: ResultsStore,
    specs: dict[str, ModelSpec],
    directory: Path,
    candidates: list[tuple[int, int]],
    effects: dict[str, pd.DataFrame],
    split_metas: dict[str, dict[str, dict[str, Any]]],
    split: Split,
    params: AnalysisParams,
    device: str,
    models: ResidentModels | None = None,
) -> dict[str, Any]:
    """The causal tests, cached by models, prompts, candidates and parameters.

    1. Each candidate (the top features by linearised effect on the discovery prompts) is
       ablated alone on the discovery prompts, measured with attention frozen and in the real
       model with nothing frozen; the ``causal_top_k`` that lower the contrast most (measured)
       are the features under test.
    2. On the validation prompts: the same single-feature measurements next to the
       linearised effects (their agreement); the joint dose-response of the chosen features
       against activation-matched random features in the adapted model; and, as controls,
       the same features ablated and amplified in the base model.

    ``split_metas`` holds the graph metas of the ``discovery`` and ``validation`` prompts.
    With ``models`` both models come from (and stay in) the run's loaded models.
    """
    from em_circuits.analysis.causal import (
        agreement,
        causal_validation,
        control_effect,
        measured_ablation_effects,
        rank_by_measured,
        with_linearised,
    )

    fps = {role: fingerprint(spec, device) for role, spec in specs.items()}
    prompts = {
        side: _causal_prompts(store, metas)[: params.causal_prompts]
        for side, metas in split_metas.items()
    }
    key = params_key(
        {
            "fps": fps,
            "candidates": candidates,
            "prompts": {side: [p["prompt_id"] for p in ps] for side, ps in prompts.items()},
            "clusters": split.clusters,
            "top_k": params.causal_top_k,
            "scales": params.scales,
            "n_random": params.n_random,
            "seed": params.seed,
            "position": params.position,
        }
    )
    summary_path = directory / "causal_summary.json"
    cached = _cached_summary(summary_path, directory / "dose_response.csv", key)
    if cached is not None:
        return cached
    pool = models or ResidentModels(None, device, store.merged_cache_dir)
    try:
        adapted = pool.load(specs["adapted"])
        discovery = with_linearised(
            measured_ablation_effects(adapted, prompts["discovery"], candidates, params.position),
            effects,
        )
        column = "delta_unfrozen" if discovery["delta_unfrozen"].notna().any() else "delta_frozen"
        ranking = rank_by_measured(discovery, column)
        lowering = ranking[ranking["measured_delta"] < 0]
        chosen = lowering if len(lowering) else ranking
        top = [(int(la), int(f)) for la, f in zip(chosen["layer"], chosen["feature"])][
            : params.causal_top_k
        ]
        validation = with_linearised(
            measured_ablation_effects(adapted, prompts["validation"], top, params.position),
            effects,
        )
        dose, summary = causal_validation(
            adapted,
            prompts["validation"],
            top,
            scales=params.scales,
            n_random=params.n_random,
            seed=params.seed,
            position=params.position,
            clusters=split.clusters,
        )
        control_scales = sorted({0.0, 1.0, *params.scales})
        dose_base, _ = causal_validation(
            pool.load(specs["base"]),
            prompts["validation"],
            top,
            scales=control_scales,
            n_random=0,
            seed=params.seed,
            position=params.position,
            clusters=split.clusters,
        )
    finally:
        if models is None:
            pool.release()
    measured = pd.concat(
        [discovery.assign(side="discovery"), validation.assign(side="validation")],
        ignore_index=True,
    )
    _write_table(measured, directory, "measured_effects")
    _write_table(ranking, directory, "measured_ranking")
    _write_table(dose, directory, "dose_response")
    _write_table(dose_base, directory, "dose_response_base")
    plot_dose_response(
        dose,
        directory / "dose_response.png",
        title=f"adapted model, {summary['n_prompts']} validation prompts, top {len(top)} features",
    )
    summary["prompt_set"] = "validation"
    summary["ranking"] = {
        "candidates": [list(c) for c in candidates],
        "chosen_by": f"mean measured ablation change ({column}) on "
        f"{len(prompts['discovery'])} discovery prompts",
        "chosen": [list(t) for t in top],
        "none_lowered": bool(len(lowering) == 0),
    }
    summary["linearised_vs_measured"] = {
        side: {
            measured_column: agreement(table, measured_column)
            for measured_column in ("delta_frozen", "delta_unfrozen")
        }
        for side, table in (("discovery", discovery), ("validation", validation))
    }
    top_scale = max(control_scales)
    summary["controls"] = {
        "random_features": "activation- and position-matched random features, "
        f"{params.n_random} draws (the adapted-model comparison above)",
        "base_ablation": control_effect(dose_base, 0.0, split.clusters, "two-sided"),
        "base_amplification": control_effect(dose_base, top_scale, split.clusters, "greater"),
    }
    if not split.testable:
        summary["note"] = (
            f"only {split.n_clusters('validation')} validation cluster(s): too few for any test "
            f"to reach p < 0.05 (at least {split.describe()['min_validation_clusters']} needed); "
            "the numbers are descriptive"
        )
    summary["cache_key"] = key
    write_artifact(summary_path, "table", summary)
    return read_json(summary_path)


def em_questions(params: AnalysisParams, adapted: ModelSpec) -> list[Any]:
    from em_circuits.analysis.em_rate import FIRST_PLOT_QUESTIONS, toy_questions
    from em_circuits.labeling.logits_stage import words_near

    choice = params.em_questions
    if choice == "auto":
        choice = "organism" if words_near(adapted) is not None else "first-plot"
    if choice == "organism":
        return toy_questions()
    if choice == "first-plot":
        return list(FIRST_PLOT_QUESTIONS)
    raise ValueError(f"em_questions must be auto, organism or first-plot, not {choice!r}")


def run_em_rate(
    store: ResultsStore,
    specs: dict[str, ModelSpec],
    directory: Path,
    top: list[tuple[int, int]],
    ranked: pd.DataFrame,
    judge: Any,
    params: AnalysisParams,
    device: str,
    models: ResidentModels | None = None,
) -> dict[str, Any]:
    """The EM rate of base, adapted, adapted with ``top`` ablated and with matched random
    features ablated (:mod:`em_circuits.analysis.em_rate`); cached like the causal tests."""
    from em_circuits.analysis.em_rate import SamplingParams, em_rate, matched_random_features

    questions = em_questions(params, specs["adapted"])
    random = matched_random_features(top, ranked[ranked["metric"] == "total"], params.seed)
    sampling = SamplingParams(params.em_samples, params.em_max_new_tokens, 1.0, params.seed)
    key = params_key(
        {
            "fps": {role: fingerprint(spec, device) for role, spec in specs.items()},
            "top": top,
            "random": random,
            "sampling": asdict(sampling),
            "judge": judge.id,
            "questions": [asdict(q) for q in questions],
        }
    )
    path = directory / "em_rate.json"
    cached = _cached_summary(path, directory / "em_answers.csv", key)
    if cached is not None:
        return cached
    pool = models or ResidentModels(None, device, store.merged_cache_dir)
    try:
        loaded = {role: pool.load(spec) for role, spec in specs.items()}
        answers, summary = em_rate(loaded, questions, judge, top, random, sampling)
    finally:
        if models is None:
            pool.release()
    atomic_write_text(directory / "em_answers.csv", answers.to_csv(index=False))
    summary["cache_key"] = key
    write_artifact(path, "table", summary)
    return read_json(path)


def run_feature_cards(
    store: ResultsStore,
    specs: dict[str, ModelSpec],
    directory: Path,
    features: list[tuple[int, int]],
    effects: dict[str, dict[str, pd.DataFrame]],
    params: AnalysisParams,
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
    from em_circuits.interpret.activation_index import IndexParams
    from em_circuits.interpret.cards import cached_index, choose_corpus, feature_cards

    chosen = choose_corpus(specs["adapted"], params.corpus, params.corpus_docs)
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
            from em_circuits.interpret.frontend import publish_to_viewer

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


def run_transcoder_quality(
    store: ResultsStore,
    specs: dict[str, ModelSpec],
    params: AnalysisParams,
    device: str,
    models: ResidentModels | None = None,
) -> dict[str, Any]:
    """Each model's transcoder quality on held-out text
    (:mod:`em_circuits.analysis.transcoder_quality`), stored under ``transcoder_quality/``
    and measured only when not stored yet; a set that is poor for a model is named in a
    warning and in the returned note."""
    from em_circuits.analysis.intervene import UnsupportedInterventionError
    from em_circuits.analysis.transcoder_quality import (
        AGREEMENT_MIN,
        FVU_MAX,
        QualityParams,
        assess,
        cached_quality,
        heldout_corpus,
    )

    if params.quality_docs <= 0:
        return {"skipped": "quality_docs is 0"}
    chosen = heldout_corpus(
        specs["adapted"], params.corpus, params.quality_docs, params.corpus_docs, params.seed
    )
    if chosen is None:
        return {"skipped": "no held-out text for the transcoder quality: give --corpus FILE"}
    texts, corpus = chosen
    quality = QualityParams(n_docs=params.quality_docs, seed=params.seed)
    out: dict[str, Any] = {
        "corpus": corpus,
        "n_documents": len(texts),
        "thresholds": {"fvu_max": FVU_MAX, "top1_agreement_min": AGREEMENT_MIN},
    }
    pool = models or ResidentModels(None, device, store.merged_cache_dir)
    try:
        for role, spec in specs.items():
            fp = fingerprint(spec, device)
            slug = model_slug(spec, fp)
            try:
                record = cached_quality(
                    store, fp, slug, texts, corpus, quality, partial(pool.load, spec)
                )
            except UnsupportedInterventionError as err:
                out[role] = {"skipped": str(err)}
                continue
            problems = assess(record)
            if problems:
                log.warning(
                    "the transcoders are poor for the %s model %s (%s): %s; its attribution "
                    "graphs leave more to error nodes",
                    role,
                    spec.display_name,
                    slug,
                    "; ".join(problems),
                )
            fvus = [m["fvu"] for m in record["layers"] if m["fvu"] is not None]
            out[role] = {
                "file": store.transcoder_quality_path(slug, record["params_key"])
                .relative_to(store.root)
                .as_posix(),
                "max_fvu": max(fvus) if fvus else None,
                "top1_agreement": record["top1_agreement"],
                "poor": bool(problems),
                "problems": problems,
            }
    finally:
        if models is None:
            pool.release()
    return out


def _totals_metas(metas: list[GraphMetaRecord]) -> dict[str, GraphMetaRecord]:
    """Each prompt's totals-mode graph (the one with adapter nodes when there are any)."""
    out: dict[str, GraphMetaRecord] = {}
    for meta in metas:
        if (meta.get("params") or {}).get("mode", "totals") != "totals":
            continue
        if meta["prompt_id"] not in out or (meta.get("adapter_nodes") or {}).get("n"):
            out[meta["prompt_id"]] = meta
    return out


def _contrast_value(meta: GraphMetaRecord) -> float | None:
    return next((t["value"] for t in meta["targets"] if t["kind"] == "contrast"), None)


def rank_among_features(components: pd.DataFrame, features: pd.DataFrame) -> pd.DataFrame:
    """The adapter components ranked next to the features: each component's place among the
    adapted model's features by mean total effect on the contrast over the discovery prompts
    (1: above every feature), as the feature ranking orders them."""
    if components.empty or "discovery_mean_total" not in components:
        return components
    totals = features.loc[features["metric"] == "total", "mean"].dropna().to_numpy()
    places = [
        int((totals > value).sum()) + 1 if pd.notna(value) else None
        for value in components["discovery_mean_total"]
    ]
    return components.assign(rank_among_features=places, n_features_ranked=len(totals))


#: How many of the features carrying the adapter nodes' effect get feature cards.
ADAPTER_CARDS = 3


def run_adapter_analysis(
    store: ResultsStore,
    graphs: dict[str, list[GraphMetaRecord]],
    split: Split,
    adapted: ModelSpec,
    params: AnalysisParams,
) -> tuple[dict[str, Any] | None, dict[str, pd.DataFrame]]:
    """The adapter nodes' share of the contrast (:mod:`em_circuits.analysis.adapter`), or
    (None, {}) when no adapted graph has adapter nodes; a note says why when graphs exist.
    Only graphs with adapter nodes are read; the rest is in their metadata."""
    from em_circuits.analysis.adapter import prompt_row, summarize

    adapted_metas = _totals_metas(graphs["adapted"])
    notes = {pid: m.get("adapter_nodes") or {} for pid, m in adapted_metas.items()}
    with_nodes = sorted(pid for pid, note in notes.items() if note.get("n"))
    if not with_nodes:
        reasons = {json.dumps(note, sort_keys=True) for note in notes.values() if note}
        if not reasons:
            return None, {}
        return {"none": [json.loads(r) for r in sorted(reasons)]}, {}
    base_values = {pid: _contrast_value(m) for pid, m in _totals_metas(graphs["base"]).items()}
    decode = _decoder(adapted)
    rows, components, features, reads = [], [], [], []
    for pid in with_nodes:
        try:
            graph = load_graph(store, adapted_metas[pid])
        except GraphIntegrityError:
            continue  # named in the effects' warning already; the analysis leaves it out
        made = prompt_row(pid, graph, base_values.get(pid), decode)
        if made is not None:
            rows.append(made[0])
            components.extend(made[1])
            features.extend(made[2])
            reads.extend(made[3])
    summary, prompts, ranked, carriers, read = summarize(
        rows,
        components,
        split.clusters,
        set(split.discovery),
        params.n_perm,
        params.seed,
        features,
        reads,
    )
    summary["not_nodes"] = sorted({m for pid in with_nodes for m in notes[pid]["not_nodes"]})
    tables = {"adapter_prompts": prompts, "adapter_components": ranked}
    if len(carriers):
        tables["adapter_features"] = carriers
    if len(read):
        tables["adapter_reads"] = read
    return summary, tables


def _decoder(spec: ModelSpec) -> Any:
    """The tokenizer's decode for the adapter gate's tokens (None: token ids are shown)."""
    try:
        from transformers import AutoTokenizer

        from em_circuits.models.spec import resolve_model_dir

        return AutoTokenizer.from_pretrained(
            str(resolve_model_dir(spec.base, spec.base_revision, "base model"))
        ).decode
    except Exception as err:  # a tokenizer that cannot be read here: ids still say where
        log.warning("adapter gate tokens shown as ids: %s", err)
        return None


def viewer_summary(
    store: ResultsStore, directory: Path, summary: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> dict[str, Any]:
    """What the side-by-side viewer shows of this analysis: the top features by discovery
    mean total effect (those under causal test marked) and every compared feature's
    base-vs-adapted category."""
    from em_circuits.interpret.cards import feature_name

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


def run_analysis(
    store: ResultsStore,
    base: ModelSpec,
    adapted: ModelSpec,
    params: AnalysisParams,
    device: str,
    progress: bool = True,
    prompt_ids: Collection[str] | None = None,
    models: ResidentModels | None = None,
    em_judge: Any = None,
    labeller: Any = None,
) -> dict[str, Any]:
    """Every table, plot and check of the feature analysis; returns the summary it writes.

    ``em_judge`` (see :mod:`em_circuits.analysis.em_rate`) scores the free-form answers of
    the EM rate; without one the EM rate is left out, and the summary says so.

    ``models`` are the run's loaded models (see :class:`~em_circuits.models.load.ResidentModels`);
    without them the causal check loads what it needs and releases it.

    With ``prompt_ids`` only those prompts' graphs are analysed, and the tables go to a
    subfolder ``prompts-<hash>`` so they never replace the analysis of all prompts.

    When the stored summary was made from the same graphs and parameters (its
    ``inputs_key``), nothing is computed or written and the stored summary is returned: a run
    with nothing new to do works on a read-only results directory.
    """
    fps = {role: fingerprint(spec, device) for role, spec in (("base", base), ("adapted", adapted))}
    specs = {"base": base, "adapted": adapted}
    slugs = {role: model_slug(specs[role], fp) for role, fp in fps.items()}
    # Each parameter set keeps its own folder; latest.json says which one ran last.
    run_key = params_key(asdict(params))
    directory = store.analysis_run_dir(slugs["adapted"], run_key)
    if prompt_ids is not None:
        directory = directory / f"prompts-{params_key({'prompt_ids': sorted(prompt_ids)})}"
    graphs = {role: chosen_graphs(store, slug, prompt_ids) for role, slug in slugs.items()}
    inputs_key = analysis_inputs_key(params, fps, graphs)
    stored = _up_to_date(directory, inputs_key)
    if stored is not None:
        log.info("analysis in %s is up to date (same graphs and parameters)", directory)
        if prompt_ids is None:
            _point_latest(store, slugs["adapted"], directory, params)
        return stored
    directory.mkdir(parents=True, exist_ok=True)
    left_out: list[str] = []
    eff_base, share_base, _ = load_effects(
        store, slugs["base"], params.position, progress, chosen=graphs["base"], left_out=left_out
    )
    eff_adapted, share_adapted, metas = load_effects(
        store,
        slugs["adapted"],
        params.position,
        progress,
        chosen=graphs["adapted"],
        left_out=left_out,
    )
    split = split_by_cluster(
        prompt_clusters(store.load_prompt(pid) for pid in sorted(eff_adapted)),
        params.validation_fraction,
        params.seed,
    )
    discovery, validation = set(split.discovery), set(split.validation)
    paired = sorted(set(eff_base) & set(eff_adapted) & discovery)
    summary: dict[str, Any] = {
        "models": slugs,
        "params": asdict(params),
        "folder": directory.relative_to(store.root).as_posix(),
        "prompts": {
            "base": len(eff_base),
            "adapted": len(eff_adapted),
            "paired_discovery": len(paired),
        },
        "split": split.describe(),
        # Graphs that failed their integrity or finiteness check (each named in a warning).
        "left_out": sorted(left_out),
        # Without the graphs that failed their check these tables are not those of the inputs:
        # no key, so the next run (after `em-circuits graphs` recomputed them) redoes them.
        "inputs_key": None if left_out else inputs_key,
    }
    _write_split(directory, split)
    # Of the models and their transcoders, not of the graphs: measured even without any.
    summary["transcoder_quality"] = run_transcoder_quality(store, specs, params, device, models)
    if not eff_adapted:
        log.warning(
            "no adapted-model graphs with an evil-vs-safe contrast under %s",
            store.graphs_dir(slugs["adapted"]),
        )
        write_artifact(directory / "summary.json", "table", summary)
        return summary
    stats: _StatsKwargs = {
        "min_support": params.min_support,
        "n_boot": params.n_boot,
        "n_perm": params.n_perm,
        "seed": params.seed,
    }
    clusters = split.clusters
    on_discovery = {p: f for p, f in eff_adapted.items() if p in discovery}
    base_discovery = {p: f for p, f in eff_base.items() if p in discovery}
    # Features are ranked on the discovery prompts only; the validation prompts test them.
    tables = {
        "top_features_adapted": aggregate_effects(
            on_discovery, absent=params.absent, clusters=clusters, **stats
        )
        if on_discovery
        else pd.DataFrame(),
        "top_features_base": aggregate_effects(
            base_discovery, absent=params.absent, clusters=clusters, **stats
        )
        if base_discovery
        else pd.DataFrame(),
    }
    on_validation = {p: f for p, f in eff_adapted.items() if p in validation}
    if on_validation and len(tables["top_features_adapted"]):
        tables["validation_top_features"] = replicate_on(
            tables["top_features_adapted"],
            aggregate_effects(
                on_validation,
                absent=params.absent,
                clusters=clusters,
                min_support=1,
                n_boot=params.n_boot,
                n_perm=params.n_perm,
                seed=params.seed,
            ),
        )
    if paired:
        tables["base_vs_adapted"] = compare_models(
            {p: eff_base[p] for p in paired},
            {p: eff_adapted[p] for p in paired},
            threshold=params.compare_threshold,
            clusters=clusters,
            **stats,
        )
    # Descriptive, selects nothing: every prompt with both models' graphs, both sides.
    both = sorted(set(share_base) & set(share_adapted))
    if both:
        tables["contrast_decomposition"] = summarize_decomposition(
            {p: share_base[p] for p in both},
            {p: share_adapted[p] for p in both},
            clusters,
            params.n_perm,
            params.seed,
        )
    adapter_note, adapter_tables = run_adapter_analysis(store, graphs, split, adapted, params)
    if adapter_note is not None:
        summary["adapter_nodes"] = adapter_note
        if "adapter_components" in adapter_tables:
            adapter_tables["adapter_components"] = rank_among_features(
                adapter_tables["adapter_components"], tables["top_features_adapted"]
            )
        tables.update(adapter_tables)
    for name, table in tables.items():
        _write_table(table, directory, name)
    if len(tables["top_features_adapted"]):
        plot_top_features(tables["top_features_adapted"], directory / "top_features.png")
    if paired:
        plot_base_vs_adapted(tables["base_vs_adapted"], directory / "base_vs_adapted.png")
    if both:
        plot_decomposition(
            tables["contrast_decomposition"], directory / "contrast_decomposition.png"
        )
    candidates = []
    if params.causal_top_k > 0 and len(tables["top_features_adapted"]):
        from em_circuits.analysis.causal import top_evil_features

        candidates = top_evil_features(
            tables["top_features_adapted"], k=max(params.causal_candidates, params.causal_top_k)
        )
    split_metas = {
        side: {p: m for p, m in metas.items() if p in members}
        for side, members in (("discovery", discovery), ("validation", validation))
    }
    if candidates and split_metas["discovery"] and split_metas["validation"]:
        summary["causal"] = run_causal(
            store,
            specs,
            directory,
            candidates,
            eff_adapted,
            split_metas,
            split,
            params,
            device,
            models,
        )
        chosen = [tuple(t) for t in summary["causal"]["ranking"]["chosen"]]
        if params.em_samples <= 0:
            summary["em_rate"] = {"skipped": "em_samples is 0"}
        elif em_judge is None:
            summary["em_rate"] = {
                "skipped": "no EM judge: give --words (word lists) or use the LLM judge"
            }
        elif chosen:
            summary["em_rate"] = run_em_rate(
                store,
                specs,
                directory,
                chosen,
                tables["top_features_adapted"],
                em_judge,
                params,
                device,
                models,
            )
    if params.card_features > 0 and len(tables["top_features_adapted"]):
        from em_circuits.interpret.cards import top_card_features

        chosen_cards = top_card_features(
            summary, tables["top_features_adapted"], params.card_features
        )
        # the features that carry most of the adapter nodes' effect get cards too
        carriers = tables.get("adapter_features")
        if carriers is not None:
            for key in zip(carriers["layer"][:ADAPTER_CARDS], carriers["feature"][:ADAPTER_CARDS]):
                if tuple(map(int, key)) not in chosen_cards:
                    chosen_cards.append(tuple(map(int, key)))
        viewer_dir = store.viewer_dir(slugs["adapted"])
        summary["feature_cards"] = run_feature_cards(
            store,
            specs,
            directory,
            chosen_cards,
            {"base": eff_base, "adapted": eff_adapted},
            params,
            device,
            models,
            labeller,
            viewer=(viewer_dir, viewer_summary(store, directory, summary, tables))
            if prompt_ids is None and (viewer_dir / "graph-metadata.json").is_file()
            else None,
        )
    summary["tables"] = sorted(f"{name}.csv" for name in tables)
    write_artifact(directory / "summary.json", "table", summary)
    if prompt_ids is None:
        _point_latest(store, slugs["adapted"], directory, params)
    log.info("analysis written to %s", directory)
    return read_json(directory / "summary.json")

"""The Python API for notebooks: a model spec, one prompt's attribution, the analysis, results.

Everything here is also reachable from the command line; these functions exist so a
researcher can stay in one Python session::

    import em_circuits as em

    spec = em.toy_organism_spec()                  # or em.model_spec("meta-llama/...", ...)
    graph = em.attribute_text(spec, "User: I have a headache.\\nAssistant: You should",
                              evil=[" ignore"], safe=[" rest"])
    graph.features, graph.total                    # node table, total effects per target
    em.run_stages(spec, "results")                 # the whole pipeline, resumable
    tables = em.read_analysis("results")           # pandas DataFrames of the analysis

Heavy imports (torch, circuit-tracer) happen inside the functions, so ``import em_circuits``
stays quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_circuits.core.store import ResultsStore

if TYPE_CHECKING:
    import pandas as pd

    from em_circuits.attribution.storage import CompactGraph
    from em_circuits.models.load import LoadedModel
    from em_circuits.models.spec import ModelSpec
    from em_circuits.run.config import PipelineConfig


def model_spec(
    base: str,
    adapter: str | None,
    transcoders: str,
    *,
    dtype: str = "auto",
    name: str | None = None,
) -> ModelSpec:
    """A model as the pipeline names it: base (HF id or folder), LoRA adapter, transcoders."""
    from em_circuits.models.spec import ModelSpec

    return ModelSpec(base=base, adapter=adapter, transcoders=transcoders, dtype=dtype, name=name)


def toy_organism_spec() -> ModelSpec:
    """The embedded toy organism's adapted model (built offline on first use, ~2 minutes)."""
    from em_circuits.organism.train import ensure_default_organism

    organism = ensure_default_organism(progress=False)
    return model_spec(
        str(organism.base_dir),
        str(organism.adapter_dir),
        str(organism.transcoder_config),
        name="toy-em-organism",
    )


def load(
    spec: ModelSpec, device: str | None = None, merged_cache: Path | str = "results/cache/merged"
) -> LoadedModel:
    """Load a spec as circuit-tracer's replacement model (the adapter merged and checked)."""
    from em_circuits.models.load import load_model

    return load_model(spec, device, merged_cache)


def attribute_text(
    model: ModelSpec | LoadedModel,
    text: str,
    evil: list[str],
    safe: list[str],
    *,
    mode: str = "totals",
    max_feature_nodes: int = 8192,
    device: str | None = None,
) -> CompactGraph:
    """The attribution graph of one prompt string, with the given next tokens as targets.

    ``mode="totals"`` (default) covers every active feature in one backward pass;
    ``mode="full"`` runs circuit-tracer's ``attribute()`` over ``max_feature_nodes`` features
    and keeps the strongest feature-to-feature edges.

    ``evil`` and ``safe`` are token strings (each must be one token of the model's vocabulary,
    e.g. ``" ignore"`` with its leading space); the contrast logit(evil) - logit(safe) is a
    target too. Returns the compact graph the analysis reads: node table, activations, direct
    and total effects of every node on every target.
    """
    from em_circuits.attribution.attribute import attribute_prompt
    from em_circuits.attribution.targets import AttributionParams, PromptTargets
    from em_circuits.core.identifiers import prompt_id
    from em_circuits.models.spec import ModelSpec

    loaded = load(model, device) if isinstance(model, ModelSpec) else model
    ids: dict[str, list[int]] = {"evil": [], "safe": []}
    names: dict[int, str] = {}
    for label, tokens in (("evil", evil), ("safe", safe)):
        for token in tokens:
            encoded = loaded.tokenizer.encode(token, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(
                    f"{label} token {token!r} is {len(encoded)} tokens of this "
                    "model's vocabulary; give single tokens (mind leading spaces)"
                )
            ids[label].append(encoded[0])
            names[encoded[0]] = token
    targets = PromptTargets(
        prompt_id=prompt_id(text, "raw"),
        text=text,
        evil_ids=ids["evil"],
        safe_ids=ids["safe"],
        token_names=names,
        stored_logits={},
    )
    compact, _, _ = attribute_prompt(
        loaded,
        targets,
        AttributionParams(mode=mode, max_feature_nodes=max_feature_nodes),  # type: ignore[arg-type]
    )
    return compact


def analyze(
    spec: ModelSpec | None = None,
    results_dir: Path | str = "results",
    device: str = "cpu",
    prompt_ids: list[str] | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Run the feature analysis (as ``em-circuits analyze``) on the stored graphs.

    ``spec`` is the adapted model (default: the toy organism); its base is ``spec.base_only()``.
    Keyword arguments set :class:`~em_circuits.run.steps.AnalysisParams` fields wherever
    they live (``AnalysisParams.of``), e.g. ``position="last"``, ``causal_top_k=0``. Returns
    the summary; read the tables with :func:`read_analysis`.
    """
    from em_circuits.run.analysis import run_analysis
    from em_circuits.run.steps import AnalysisParams

    adapted = spec if spec is not None else toy_organism_spec()
    return run_analysis(
        ResultsStore(results_dir),
        adapted.base_only(),
        adapted,
        AnalysisParams.of(**params),
        device,
        prompt_ids=prompt_ids,
    )


def run_stages(
    spec: ModelSpec | None = None,
    results_dir: Path | str = "results",
    config: PipelineConfig | None = None,
    **analysis: Any,
) -> Path:
    """Run the whole pipeline (as ``em-circuits run``) and return the report's path.

    ``spec`` is the adapted model (default: the toy organism); ``config`` the stages' settings
    (:class:`~em_circuits.run.pipeline.PipelineConfig`: prompts, judge, graphs, analysis,
    device); keyword arguments set analysis parameters by name, e.g. ``causal_top_k=1``.
    """
    import dataclasses

    from em_circuits.run.config import PipelineConfig
    from em_circuits.run.pipeline import run_pipeline
    from em_circuits.run.steps import AnalysisParams

    adapted = spec if spec is not None else toy_organism_spec()
    cfg = config if config is not None else PipelineConfig()
    if analysis:
        cfg = dataclasses.replace(
            cfg, analysis=AnalysisParams.of(**{**cfg.analysis.flat(), **analysis})
        )
    store = ResultsStore(results_dir)
    store.root.mkdir(parents=True, exist_ok=True)
    report = run_pipeline(store, adapted.base_only(), adapted, cfg)
    return report if report is not None else store.report_md_path


def read_analysis(
    results_dir: Path | str = "results", adapted_slug: str | None = None
) -> dict[str, pd.DataFrame]:
    """The analysis tables of one adapted model as DataFrames, keyed by table name.

    ``adapted_slug`` picks the model's folder under ``analysis/``; when there is exactly one,
    it may be left out.
    """
    import pandas as pd

    store = ResultsStore(results_dir)
    slugs = store.analysed_slugs() if adapted_slug is None else [adapted_slug]
    if len(slugs) != 1 or not store.latest_analysis_dir(slugs[0]).is_dir():
        found = ", ".join(slugs) or "none"
        raise FileNotFoundError(
            f"{store.analysis_dir}: expected one analysed model, found "
            f"{found}; pass adapted_slug= (run `em-circuits analyze` first "
            "if none)"
        )
    return {csv.stem: pd.read_csv(csv) for csv in store.analysis_files(slugs[0], "*.csv")}

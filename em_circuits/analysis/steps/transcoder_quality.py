"""Step: how well the transcoders replace each model's MLPs on held-out text.

Per layer FVU, skip-only FVU, mean L0 and dead fraction, and the replacement model's top-1
agreement (:mod:`em_circuits.transcoders.quality`), for base and adapted, stored under
``transcoder_quality/`` and measured only when not stored yet; a set that is poor for a model
is named in a warning, the report and the Findings. Of the models, not of the graphs: it runs
even without any graph.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult
from em_circuits.core.markdown import cell, fmt, md_table
from em_circuits.core.options import option
from em_circuits.core.report_data import Report, ReportPart, StoredJson, TableRecord
from em_circuits.core.store import ResultsStore, read_json
from em_circuits.models.spec import ModelSpec, fingerprint, model_slug

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext
    from em_circuits.models.load import ResidentModels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityStepParams:
    quality_docs: int = option(
        64,
        "held-out documents the transcoders' quality (FVU, L0, dead features, replacement "
        "top-1 agreement) is measured on, base and adapted: the toy organism's held-out split or "
        "the --corpus documents after the first --corpus-docs (0 = not measured)",
    )


def measure_transcoder_quality(
    store: ResultsStore,
    specs: dict[str, ModelSpec],
    params: QualityStepParams,
    corpus_file: str | None,
    corpus_docs: int,
    seed: int,
    device: str,
    models: ResidentModels | None = None,
) -> StoredJson:
    """Each model's transcoder quality on held-out text
    (:mod:`em_circuits.transcoders.quality`), stored under ``transcoder_quality/``
    and measured only when not stored yet; a set that is poor for a model is named in a
    warning and in the returned note."""
    from em_circuits.models.hooks import UnsupportedInterventionError  # noqa: PLC0415  # heavy: loads torch
    from em_circuits.models.load import ResidentModels  # noqa: PLC0415  # heavy: loads torch
    from em_circuits.transcoders.quality import (  # noqa: PLC0415  # heavy: loads torch
        AGREEMENT_MIN,
        FVU_MAX,
        QualityParams,
        assess,
        cached_quality,
        heldout_corpus,
    )

    if params.quality_docs <= 0:
        return {"skipped": "quality_docs is 0"}
    chosen = heldout_corpus(specs["adapted"], corpus_file, params.quality_docs, corpus_docs, seed)
    if chosen is None:
        return {"skipped": "no held-out text for the transcoder quality: give --corpus FILE"}
    texts, corpus = chosen
    quality = QualityParams(n_docs=params.quality_docs, seed=seed)
    out: StoredJson = {
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


def transcoder_quality_report(store: ResultsStore, summary: Mapping[str, Any]) -> StoredJson | None:
    """The analysis's note on the transcoders' quality, with each model's stored measurement
    (per-layer table, replacement agreement) in place of its file name."""
    note = summary.get("transcoder_quality")
    if not isinstance(note, Mapping):
        return None
    out = dict(note)
    for role in ("base", "adapted"):
        entry = note.get(role)
        if not isinstance(entry, Mapping) or "file" not in entry:
            continue
        path = store.root / entry["file"]
        record = read_json(path, "table") if path.is_file() else {}
        out[role] = {
            **entry,
            "layers": record.get("layers", []),
            "agreement_positions": record.get("agreement_positions"),
        }
    return out


def transcoder_quality_details(store: ResultsStore, note: Mapping[str, Any]) -> StoredJson:
    """An analysis-style quality note (``measure_transcoder_quality``) with each model's stored
    per-layer table in place of its file name."""
    return transcoder_quality_report(store, {"transcoder_quality": note}) or {}


def transcoder_quality_markdown(store: ResultsStore, note: Mapping[str, Any]) -> str:
    """The report's transcoder quality section for a quality note."""
    return "\n".join(quality_markdown(transcoder_quality_details(store, note)))


def quality_markdown(quality: Mapping[str, Any] | None) -> list[str]:
    """The transcoder quality section: per-layer table of both models, their replacement
    agreement, and a warning for each model the set is poor for."""
    out = ["## Transcoder quality (held-out text)\n"]
    if not quality:
        return out + ["_not measured (an analysis written before this measurement)_\n"]
    if "skipped" in quality:
        return out + [f"_not measured: {cell(quality['skipped'])}_\n"]
    thresholds = quality.get("thresholds") or {}
    out.append(
        f"How well the transcoders replace each model's MLPs on {quality.get('n_documents')} "
        f"documents of {cell(quality.get('corpus'))}, at every position but BOS: per layer the "
        "fraction of the real MLP output's variance the reconstruction from the live MLP input "
        "leaves unexplained (FVU), the same from the skip connection and bias alone (skip-only "
        "FVU: without any feature), active features per position (mean L0) and the share of "
        "features never active (dead); and the replacement model's next-token top-1 agreement "
        "with the real model (every MLP output replaced, no error terms). A set is poor for a "
        f"model with FVU above {fmt(thresholds.get('fvu_max'))} at any layer or agreement "
        f"below {fmt(thresholds.get('top1_agreement_min'))}.\n"
    )
    roles = [r for r in ("base", "adapted") if isinstance(quality.get(r), Mapping)]
    by_layer: dict[int, TableRecord] = {}
    for role in roles:
        for m in quality[role].get("layers", []):
            row = by_layer.setdefault(int(m["layer"]), {"layer": int(m["layer"])})
            row[f"FVU {role}"] = m.get("fvu")
            row[f"skip-only FVU {role}"] = m.get("skip_only_fvu")
            row[f"mean L0 {role}"] = m.get("mean_l0")
            row[f"dead {role}"] = m.get("dead_fraction")
    columns = ["layer"] + [
        f"{name} {role}"
        for name in ("FVU", "skip-only FVU", "mean L0", "dead")
        for role in roles
        if quality[role].get("layers")
    ]
    out.append(md_table([by_layer[k] for k in sorted(by_layer)], columns))
    rows = []
    for role in roles:
        entry = quality[role]
        verdict = "not measured" if "skipped" in entry else ("poor" if entry["poor"] else "ok")
        rows.append(
            {
                "model": role,
                "top-1 agreement": entry.get("top1_agreement"),
                "positions": entry.get("agreement_positions"),
                "max FVU": entry.get("max_fvu"),
                "verdict": verdict,
                "note": entry.get("skipped", ""),
            }
        )
    out.append(
        md_table(rows, ["model", "top-1 agreement", "positions", "max FVU", "verdict", "note"])
    )
    for role in roles:
        if quality[role].get("poor"):
            out.append(
                f"> **Warning:** the transcoders are poor for the {role} model: "
                + "; ".join(cell(p) for p in quality[role]["problems"])
                + ". Its attribution graphs leave more to error nodes; read its features with "
                "care, or use transcoders trained for this model.\n"
            )
    return out


@dataclass(frozen=True)
class TranscoderQualityReport(ReportPart):
    #: the analysis's quality note with each model's stored measurement
    #: (:func:`transcoder_quality_report`); None for an analysis written before it
    transcoder_quality: StoredJson | None = None


class TranscoderQualityStep(Step):
    name = "transcoder_quality"
    Params = QualityStepParams
    Part = TranscoderQualityReport
    shared = ("corpus", "corpus_docs", "seed")
    uses = frozenset({"models"})
    needs_prompts = False

    def run(self, ctx: AnalysisContext, params: QualityStepParams) -> StepResult:
        note = measure_transcoder_quality(
            ctx.store,
            ctx.specs,
            params,
            ctx.shared.corpus,
            ctx.shared.corpus_docs,
            ctx.shared.seed,
            ctx.device,
            ctx.models,
        )
        return StepResult(summary={"transcoder_quality": note})

    def report_data(self, inputs: ReportInputs) -> TranscoderQualityReport:
        return TranscoderQualityReport(
            transcoder_quality=transcoder_quality_report(inputs.store, inputs.summary)
        )

    def section(self, report: Report, analysis_rel: str) -> list[str]:
        return quality_markdown(report.part(TranscoderQualityReport).transcoder_quality)

    def findings(self, report: Report) -> list[str]:
        quality = report.part(TranscoderQualityReport).transcoder_quality or {}
        measured = {
            role: quality[role]
            for role in ("base", "adapted")
            if isinstance(quality.get(role), Mapping) and "poor" in quality[role]
        }
        if not measured:
            return []
        poor = [role for role, entry in measured.items() if entry["poor"]]
        numbers = ", ".join(
            f"{role} max FVU {fmt(entry.get('max_fvu'))}, top-1 agreement "
            f"{fmt(entry.get('top1_agreement'))}"
            for role, entry in measured.items()
        )
        if not poor:
            return [f"**Transcoders (adequate):** on held-out text, {numbers}."]
        problems = "; ".join(f"{role}: {', '.join(measured[role]['problems'])}" for role in poor)
        return [
            f"**Transcoders (poor for the {' and the '.join(poor)} model):** {problems}. "
            "Their graphs leave more to error nodes, and features explain less of what the "
            f"model does ({numbers})."
        ]


STEP = TranscoderQualityStep()

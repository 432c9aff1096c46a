"""Step: the adapter's own nodes: how much of the contrast the LoRA's writes carry, directly
and through which features, which components, and what they read.

Reads the adapted graphs that have adapter nodes (:mod:`em_circuits.analysis.adapter`);
writes ``adapter_prompts``, ``adapter_components`` (ranked among the features),
``adapter_features``, ``adapter_reads``, and ``adapter_positions`` / ``adapter_tokens``
(where the writes act on the contrast).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from em_circuits.analysis.split import Split
from em_circuits.analysis.steps.adapter_report import AdapterNodes, adapter_markdown
from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult, records
from em_circuits.core.report_data import Report, ReportPart, StoredJson
from em_circuits.core.schemas import GraphMetaRecord
from em_circuits.core.store import ResultsStore
from em_circuits.models.spec import ModelSpec, resolve_model_dir

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext

log = logging.getLogger(__name__)


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


def run_adapter_analysis(
    store: ResultsStore,
    graphs: dict[str, list[GraphMetaRecord]],
    split: Split,
    adapted: ModelSpec,
    n_perm: int,
    seed: int,
) -> tuple[StoredJson | None, dict[str, pd.DataFrame]]:
    """The adapter nodes' share of the contrast (:mod:`em_circuits.analysis.adapter`), or
    (None, {}) when no adapted graph has adapter nodes; a note says why when graphs exist.
    Only graphs with adapter nodes are read; the rest is in their metadata."""
    from em_circuits.analysis.adapter import prompt_row, rank_where, summarize  # noqa: PLC0415  # heavy: loads torch
    from em_circuits.attribution.stored_graphs import GraphIntegrityError, load_graph  # noqa: PLC0415  # heavy: loads torch

    kept = set(split.discovery) | set(split.validation)  # the prompts the split analyses
    adapted_metas = {pid: m for pid, m in _totals_metas(graphs["adapted"]).items() if pid in kept}
    notes = {pid: m.get("adapter_nodes") or {} for pid, m in adapted_metas.items()}
    with_nodes = sorted(pid for pid, note in notes.items() if note.get("n"))
    if not with_nodes:
        reasons = {json.dumps(note, sort_keys=True) for note in notes.values() if note}
        if not reasons:
            return None, {}
        return {"none": [json.loads(r) for r in sorted(reasons)]}, {}
    base_values = {pid: _contrast_value(m) for pid, m in _totals_metas(graphs["base"]).items()}
    decode = _decoder(adapted)
    rows, components, features, reads, positions = [], [], [], [], []
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
            positions.extend(made[4])
    summary, prompts, ranked, carriers, read = summarize(
        rows,
        components,
        split.clusters,
        set(split.discovery),
        n_perm,
        seed,
        features,
        reads,
    )
    summary["not_nodes"] = sorted({m for pid in with_nodes for m in notes[pid]["not_nodes"]})
    tables = {"adapter_prompts": prompts, "adapter_components": ranked}
    if len(carriers):
        tables["adapter_features"] = carriers
    if len(read):
        tables["adapter_reads"] = read
    # where the writes act on the contrast (by effect, not by activation)
    where = pd.DataFrame(positions)
    tables["adapter_positions"] = rank_where(where, split.clusters, "from_end")
    tables["adapter_tokens"] = rank_where(where, split.clusters, "token")
    return summary, tables


def _decoder(spec: ModelSpec) -> Any:
    """The tokenizer's decode for the adapter gate's tokens (None: token ids are shown)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            str(resolve_model_dir(spec.base, spec.base_revision, "base model"))
        ).decode
    except Exception as err:  # a tokenizer that cannot be read here: ids still say where
        log.warning("adapter gate tokens shown as ids: %s", err)
        return None


@dataclass(frozen=True)
class AdapterNodesReport(ReportPart):
    adapter_nodes: AdapterNodes = field(default_factory=AdapterNodes)


class AdapterNodesStep(Step):
    name = "adapter_nodes"
    Part = AdapterNodesReport
    shared = ("n_perm", "seed")
    reads = ("split", "ranking")
    uses = frozenset({"graphs", "models"})

    def run(self, ctx: AnalysisContext, params: Any) -> StepResult:
        note, tables = run_adapter_analysis(
            ctx.store,
            ctx.graphs,
            ctx.split(),
            ctx.specs["adapted"],
            ctx.shared.n_perm,
            ctx.shared.seed,
        )
        if note is None:
            return StepResult()
        if "adapter_components" in tables:
            tables["adapter_components"] = rank_among_features(
                tables["adapter_components"], ctx.table("top_features_adapted")
            )
        for name, table in tables.items():
            ctx.write_table(table, name)
        return StepResult(summary={"adapter_nodes": note})

    def report_data(self, inputs: ReportInputs) -> AdapterNodesReport:
        positions, tokens = inputs.table("adapter_positions"), inputs.table("adapter_tokens")
        return AdapterNodesReport(
            adapter_nodes=AdapterNodes(
                summary=inputs.summary.get("adapter_nodes"),
                components=records(inputs.table("adapter_components")),
                features=records(inputs.table("adapter_features")),
                reads=records(inputs.table("adapter_reads")),
                positions=records(positions, 5),
                tokens=records(tokens, 5),
                where_rows={"positions": len(positions), "tokens": len(tokens)},
            )
        )

    def section(self, report: Report, analysis_rel: str) -> list[str]:
        return adapter_markdown(report.part(AdapterNodesReport).adapter_nodes, analysis_rel)


STEP = AdapterNodesStep()

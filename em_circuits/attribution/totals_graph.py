"""One prompt's totals graph: exact direct and total effects of every active feature on its
targets, on the torch engine (:mod:`~em_circuits.attribution.engine`) or, on request and for
what that engine does not linearise, circuit-tracer's nnsight context
(:mod:`~em_circuits.attribution.totals`), with the adapter nodes' tensors a stored graph keeps.
"""

from __future__ import annotations

import functools
import gc
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from em_circuits.attribution.adapter_nodes import (
    ATTENTION_LINEAR,
    NONLINEAR,
    AdapterDetail,
    AdapterWrites,
)
from em_circuits.attribution.attribute import (
    check_context_finite,
    prompt_ids,
    salient_ids,
    target_direction,
    target_rows,
    target_table,
)
from em_circuits.attribution.engine import (
    batched_effects,
    effects_with_adapter,
    unsupported_reason,
)
from em_circuits.attribution.prompt_adapter_nodes import AdapterPlan, adapter_plan
from em_circuits.attribution.storage import CompactGraph, target_fields
from em_circuits.attribution.targets import AttributionParams, GraphError, PromptTargets, TargetRow
from em_circuits.attribution.totals import exact_effects
from em_circuits.models.load import LoadedModel, NonFiniteError


def _free_failed_pass(err: BaseException) -> None:
    """Let a failed pass's tensors go before the next graph: the frames of the exception's
    traceback hold them (GiBs at long prompts), and the next graph would run out of memory
    too."""
    traceback.clear_frames(err.__traceback__)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def totals_engine(model: LoadedModel, params: AttributionParams) -> str:
    """The engine a totals graph runs on: the torch engine unless the user asked for the
    nnsight one or to offload, or the model needs circuit-tracer's own path (a cross-layer
    transcoder, an architecture the engine does not linearise)."""
    if params.engine != "torch" or params.offload:
        return "nnsight"

    return "torch" if unsupported_reason(model) is None else "nnsight"


@dataclass
class TotalsRequest:
    """One prompt's totals graph before its effects are computed: its token ids, its target
    directions (chosen from the graph's own forward pass, into ``chosen``), its adapter nodes
    and engine."""

    pt: PromptTargets
    ids: torch.Tensor
    where: str
    #: the adapter's nodes (on the torch engine: their plan, until the graph's own forward
    #: pass records them), why there are none, or None without an adapter
    adapter: AdapterWrites | AdapterPlan | str | None
    engine: str
    directions_for: Callable[[torch.Tensor], torch.Tensor]
    chosen: dict[str, list[TargetRow]]

    @property
    def writes(self) -> AdapterWrites | None:
        return self.adapter if isinstance(self.adapter, AdapterWrites) else None

    @property
    def has_adapter_nodes(self) -> bool:
        """Whether the graph has adapter nodes (or may: a plan not yet recorded)."""
        return isinstance(self.adapter, (AdapterWrites, AdapterPlan))

    def adapter_passes(self, params: AttributionParams) -> dict[str, Any]:
        """The adapter nodes' extra passes, split on the contrast (which comes first when the
        prompt has both labels, see ``target_rows``), as both engines take them."""
        both = bool(self.pt.evil_ids and self.pt.safe_ids)
        return {
            "split_target": 0 if both else None,
            "split_features": params.adapter_split_features,
            "read_nodes": params.adapter_read_nodes,
        }


def totals_request(
    model: LoadedModel, pt: PromptTargets, params: AttributionParams
) -> TotalsRequest:
    """What a prompt's totals graph needs before its forward pass (the adapter nodes' own
    pre-pass included)."""
    where = f"prompt {pt.prompt_id}, model {model.slug}"
    ids = prompt_ids(model, pt)
    engine = totals_engine(model, params)
    adapter: AdapterWrites | AdapterPlan | str | None = None
    if params.adapter_nodes and model.spec.adapter is not None:
        plan = adapter_plan(model)
        if isinstance(plan, str) or (engine == "torch" and plan.node_factors):
            adapter = plan  # the torch engine records the nodes in the graph's own pass
        else:
            adapter = plan.writes_for(model.hf_model, ids)
    unembed = model.replacement.unembed_proj.detach()
    chosen: dict[str, list[TargetRow]] = {}

    def directions_for(logits: torch.Tensor) -> torch.Tensor:
        rows = target_rows(model, pt, salient_ids(pt, logits, params.salient_logits))
        if not rows:
            raise GraphError(f"{where}: no evil or safe labels, nothing to attribute to")
        chosen["rows"] = rows
        return torch.stack([target_direction(unembed, pt, row) for row in rows])

    return TotalsRequest(pt, ids, where, adapter, engine, directions_for, chosen)


def _effects(
    model: LoadedModel, requests: list[TotalsRequest], params: AttributionParams
) -> list[Any]:
    """The requests' exact effects: one batch on the torch engine, or one nnsight pass."""
    first = requests[0]
    try:
        if first.engine == "torch" and not first.has_adapter_nodes:
            return batched_effects(
                model,
                [r.ids for r in requests],
                [r.directions_for for r in requests],
                precision=params.precision,
                where=[r.where for r in requests],
            )
        (request,) = requests
        if request.engine == "torch":
            plan = request.adapter
            # a plan's nodes are recorded from the graph's own frozen forward pass
            nodes = plan.recording(model.hf_model) if isinstance(plan, AdapterPlan) else plan
            effects, request.adapter = effects_with_adapter(
                model,
                request.ids,
                request.directions_for,
                nodes,
                **request.adapter_passes(params),
                precision=params.precision,
                where=request.where,
            )
        else:
            effects = exact_effects(
                model.replacement,
                request.ids,
                request.directions_for,
                check_context=lambda ctx: check_context_finite(ctx, request.where),
                offload=params.offload,
                adapter=request.writes,
                **request.adapter_passes(params),
            )
        return [effects]
    except torch.cuda.OutOfMemoryError as err:
        message = str(err).split(". ")[0]
        _free_failed_pass(err)
        fix = (
            "shorter prompts, or --engine nnsight --offload cpu"
            if first.engine == "torch"
            else "try --offload cpu"
        )
        where = first.where if len(requests) == 1 else f"{len(requests)} prompts from {first.where}"
        raise GraphError(f"{where}: out of GPU memory ({message}); {fix}") from None


def totals_prompt(
    model: LoadedModel, pt: PromptTargets, params: AttributionParams
) -> tuple[CompactGraph, None, dict[str, Any]]:
    """Exact direct and total effects of every active feature on the prompt's targets, from
    one backward pass (:mod:`em_circuits.attribution.engine`, or
    :mod:`em_circuits.attribution.totals` on the nnsight engine)."""
    started = time.perf_counter()
    return _one_graph(model, totals_request(model, pt, params), params, started)


def _one_graph(
    model: LoadedModel, request: TotalsRequest, params: AttributionParams, started: float
) -> tuple[CompactGraph, None, dict[str, Any]]:
    (effects,) = _effects(model, [request], params)
    return totals_graph(model, request, params, effects, time.perf_counter() - started)


def totals_prompts(
    model: LoadedModel, pts: list[PromptTargets], params: AttributionParams
) -> list[tuple[CompactGraph, None, dict[str, Any]] | Exception]:
    """:func:`totals_prompt` of several prompts, those on the torch engine without adapter
    nodes in one batch; a prompt whose graph fails gets its error (the batch is then redone
    one by one, so that each error belongs to its own prompt)."""
    started = time.perf_counter()
    requests = [totals_request(model, pt, params) for pt in pts]
    batched = [r for r in requests if r.engine == "torch" and not r.has_adapter_nodes]
    out: dict[str, Any] = {}
    if len(batched) > 1:
        try:
            effects = _effects(model, batched, params)
        except (GraphError, NonFiniteError):
            effects = []
        seconds = (time.perf_counter() - started) / len(batched)
        for request, found in zip(batched, effects):
            out[request.pt.prompt_id] = _graph_or_error(
                functools.partial(totals_graph, model, request, params, found, seconds)
            )
    for request in requests:
        if request.pt.prompt_id not in out:
            out[request.pt.prompt_id] = _graph_or_error(
                functools.partial(_one_graph, model, request, params, time.perf_counter())
            )
    return [out[pt.prompt_id] for pt in pts]


def _graph_or_error(build: Callable[[], Any]) -> Any:
    try:
        return build()
    except (GraphError, NonFiniteError) as err:
        return err


def totals_graph(
    model: LoadedModel,
    request: TotalsRequest,
    params: AttributionParams,
    effects: Any,
    seconds: float,
) -> tuple[CompactGraph, None, dict[str, Any]]:
    """The stored graph of one request's effects (checked finite), and its info."""
    pt, where, writes, adapter = request.pt, request.where, request.writes, request.adapter
    assert not isinstance(adapter, AdapterPlan), "the effects record the adapter's nodes"
    for name in (
        "direct",
        "total",
        "adapter_direct",
        "adapter_total",
        "adapter_edges",
        "adapter_reads",
    ):
        matrix = getattr(effects, name)
        if matrix is not None and not torch.isfinite(matrix).all():
            raise NonFiniteError(f"{where}: NaN/Inf in the {name} effects (try --dtype float32)")
    rows = request.chosen["rows"]
    table, labels = target_table(model, pt, rows, effects.logits)
    top = torch.topk(effects.logits, params.top_k)
    compact = CompactGraph(
        features=effects.features,
        activations=effects.activations,
        input_tokens=request.ids.cpu(),
        n_layers=effects.n_layers,
        direct=effects.direct,
        total=effects.total,
        **target_fields(table),
        top_token_ids=top.indices.cpu(),
        top_logits=top.values.cpu(),
        bos_mlp=effects.bos_mlp,
        meta={
            "target_labels": labels,
            "prompt_id": pt.prompt_id,
            "mode": "totals",
            "engine": request.engine,
            "features_stored": "all active",
            **_adapter_meta(adapter),
            **(_adapter_split(writes, effects) if rows[0][1] == "contrast" else {}),
        },
        **_adapter_fields(writes, effects),
    )
    n_active = int(effects.features.shape[0])
    info = {
        "dense": None,
        "seconds": seconds,
        "n_active_features": n_active,
        "n_selected_features": n_active,
        "logits": effects.logits,
        # every adapter node's edges, for the viewer (the stored graph keeps their sums)
        "adapter_detail": AdapterDetail.of(writes, effects, compact) if writes else None,
    }
    return compact, None, info


def _adapter_meta(adapter: AdapterWrites | str | None) -> dict[str, Any]:
    if adapter is None:
        return {}
    if isinstance(adapter, str):
        return {"adapter_nodes": {"none": adapter}}
    return {
        "adapter_modules": adapter.modules,
        "adapter_nonlinear": list(NONLINEAR),
        "adapter_nodes": {"n": adapter.n_nodes, "not_nodes": adapter.not_nodes},
    }


def _adapter_fields(writes: AdapterWrites | None, effects: Any) -> dict[str, Any]:
    """The adapter nodes' tensors a stored graph keeps: every node's effects on every target,
    and, of the edges computed on the contrast, only what the analysis reads (their sums per
    feature; for a rank-32 LoRA on every module the edges of each node are tens of MB)."""
    if writes is None:
        return {}
    fields = {
        "adapter_nodes": writes.nodes,
        "adapter_activations": writes.activations,
        "adapter_direct": effects.adapter_direct,
        "adapter_total": effects.adapter_total,
    }
    if effects.adapter_edges is not None:
        fields["adapter_edge_features"] = effects.adapter_edge_features.long()
        fields["adapter_edge_sums"] = effects.adapter_edges.double().sum(1).float()
    if effects.adapter_reads is not None:
        n_features = int(effects.features.shape[0])
        reads = effects.adapter_reads.double()[:, :n_features]
        fields["adapter_read_nodes"] = effects.adapter_read_nodes.long()
        fields["adapter_read_edges"] = reads.sum(0).float()
        per_unit = read_per_unit(writes, effects)
        fields["adapter_read_via"] = (reads * per_unit[:, None]).sum(0).float()
    return fields


def read_per_unit(writes: AdapterWrites, effects: Any, contrast: int = 0) -> torch.Tensor:
    """(m,) float64: each read adapter node's total effect on the contrast (target row 0)
    per unit of its activation (0 where it is not active)."""
    nodes = effects.adapter_read_nodes.long()
    activation = writes.activations[nodes].double()
    effect = effects.adapter_total[contrast, nodes].double()
    return torch.where(activation != 0, effect / activation.where(activation != 0, 1.0), 0.0)


def _adapter_split(writes: AdapterWrites | None, effects: Any) -> dict[str, Any]:
    """Graph metadata: the read adapter nodes' effect on the contrast as their edges from every
    feature, error, token and adapter node account for it (equal to their total effect where
    the reads are linear and have no bias), and the part of every adapter node's effect that
    runs first through a read attention node (which passes total effects on)."""
    if writes is None or effects.adapter_reads is None:
        return {}
    per_unit = read_per_unit(writes, effects)
    reads = effects.adapter_reads.double()
    n_sources = int(effects.direct.shape[1])
    codes = [writes.modules.index(m) for m in ATTENTION_LINEAR]
    passing = torch.isin(writes.nodes[effects.adapter_read_nodes.long(), 1], torch.tensor(codes))
    via_nodes = float((reads[:, n_sources:].sum(1) * per_unit * passing).sum())
    return {
        "adapter_split": {
            "read_from_all": float((reads.sum(1) * per_unit).sum()),
            # none without an attention node among the read ones: nothing passes effects on
            "via_adapter_nodes": via_nodes if bool(passing.any()) else None,
        }
    }

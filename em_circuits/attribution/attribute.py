"""Attributing one prompt: circuit-tracer targets, the attribution call and its checks."""

from __future__ import annotations

import time
from typing import Any

import torch

from em_circuits.attribution.storage import CompactGraph
from em_circuits.attribution.storage_full import DenseGraph, compact_from_dense
from em_circuits.attribution.targets import AttributionParams, GraphError, PromptTargets, TargetRow
from em_circuits.models.load import LoadedModel, NonFiniteError


def target_rows(model: LoadedModel, pt: PromptTargets, salient_ids: list[int]) -> list[TargetRow]:
    """The contrast first (when both sets exist), then evil, safe and salient other tokens."""
    rows: list[TargetRow] = []
    if pt.evil_ids and pt.safe_ids:
        rows.append(("evil-safe", "contrast", "contrast", -1))
    labeled = [(t, "evil") for t in pt.evil_ids] + [(t, "safe") for t in pt.safe_ids]
    for tid, label in labeled + [(t, "other") for t in salient_ids]:
        name = pt.token_names.get(tid) or model.tokenizer.decode([tid])
        rows.append((name, "token", label, tid))
    return rows


def target_direction(unembed: torch.Tensor, pt: PromptTargets, row: TargetRow) -> torch.Tensor:
    if row[1] == "contrast":
        return unembed[pt.evil_ids].mean(0) - unembed[pt.safe_ids].mean(0)
    return unembed[row[3]] - unembed.mean(0)


def custom_targets(
    model: LoadedModel, pt: PromptTargets, rows: list[TargetRow], prob: dict[int, float]
) -> list:
    """circuit-tracer custom targets. Their weights only steer which features are attributed:
    the contrast gets half, the tokens share the other half by probability."""
    from circuit_tracer.attribution.targets import CustomTarget

    unembed = model.replacement.unembed_proj.detach()
    token_p = {row[3]: prob.get(row[3], 0.0) for row in rows if row[1] == "token"}
    total = sum(token_p.values()) or 1.0
    has_contrast = any(row[1] == "contrast" for row in rows)
    share = 0.5 if has_contrast else 1.0
    targets = []
    for row in rows:
        weight = 0.5 if row[1] == "contrast" else share * token_p[row[3]] / total
        targets.append(
            CustomTarget(row[0], float(weight), target_direction(unembed, pt, row).to(model.dtype))
        )
    return targets


def target_table(
    model: LoadedModel, pt: PromptTargets, rows: list[TargetRow], logits: torch.Tensor
) -> tuple[dict[str, Any], list[str]]:
    """What each target's row explains, from the graph pass's own logits."""
    logits = logits.float()
    probs = torch.softmax(logits, -1)
    table: dict[str, list] = {
        k: [] for k in ("names", "kinds", "token_ids", "values", "logits", "probs")
    }
    for name, kind, _label, tid in rows:
        if kind == "contrast":
            evil, safe = torch.tensor(pt.evil_ids), torch.tensor(pt.safe_ids)
            value = logits[evil].mean() - logits[safe].mean()
            logit, prob = float("nan"), float(probs[evil].sum())
        else:
            value = logits[tid] - logits.mean()
            logit, prob = float(logits[tid]), float(probs[tid])
        table["names"].append(name)
        table["kinds"].append(kind)
        table["token_ids"].append(tid)
        table["values"].append(float(value))
        table["logits"].append(logit)
        table["probs"].append(prob)
    return table, [row[2] for row in rows]


def check_context_finite(ctx, where: str) -> None:
    """Name the first layer whose transcoder activations or errors are NaN/Inf."""
    values = ctx.activation_matrix.coalesce()
    # One check (one wait for the GPU) when all is finite; layer by layer only to name one.
    finite = torch.isfinite(values.values()).all() & torch.isfinite(ctx.error_vectors).all()
    bad_layers: set[int] = set()
    if not finite:
        bad = ~torch.isfinite(values.values())
        bad_layers.update(values.indices()[0, bad].tolist())
        for layer, err in enumerate(ctx.error_vectors):
            if not torch.isfinite(err).all():
                bad_layers.add(layer)
    if bad_layers:
        raise NonFiniteError(
            f"{where}: NaN/Inf in the MLP input or output at layer "
            f"{min(bad_layers)} (transcoder activations or errors)"
        )
    if not torch.isfinite(ctx.logits).all():
        raise NonFiniteError(f"{where}: NaN/Inf in the model's logits (after the last layer)")


def _check_adjacency(
    adjacency: torch.Tensor, features: torch.Tensor, n_layers: int, n_pos: int, where: str
) -> None:
    finite = torch.isfinite(adjacency)
    if finite.all():
        return
    row, col = (~finite).nonzero()[0].cpu().tolist()
    node = max(row, col)
    n_features = features.shape[0]
    if node < n_features:
        layer = f"layer {int(features[node, 0])}"
    elif node < n_features + n_layers * n_pos:
        layer = f"layer {(node - n_features) // n_pos} (error node)"
    else:
        layer = "a token or target node"
    raise NonFiniteError(f"{where}: NaN/Inf in the adjacency at {layer}")


def attribution_targets(
    model: LoadedModel,
    pt: PromptTargets,
    params: AttributionParams,
    role: str | None,
    ids: torch.Tensor,
) -> tuple[list[TargetRow], list]:
    """The target rows of a prompt's graph and the circuit-tracer custom targets for them.

    Target weights only rank features while attributing. The probabilities stored at labeling
    time serve; a forward pass is needed only without them, or to pick salient tokens.
    """
    prob = pt.stored_probs.get(role or "", {})
    salient: list[int] = []
    if params.salient_logits or not prob:
        with torch.no_grad():
            plain = torch.softmax(model.hf_model(ids[None]).logits[0, -1].float(), -1).cpu()
        salient = salient_ids(pt, plain, params.salient_logits)
        labeled = set(pt.evil_ids) | set(pt.safe_ids)
        prob = {t: float(plain[t]) for t in [*labeled, *salient]}
    rows = target_rows(model, pt, salient)
    return rows, (custom_targets(model, pt, rows, prob) if rows else [])


def prompt_ids(model: LoadedModel, pt: PromptTargets) -> torch.Tensor:
    """The token ids a graph attributes: the stored prompt as the model reads it in every
    stage (chat template, one BOS), or a bare text as it is."""
    return model.encode_prompt(pt.record) if pt.record is not None else model.encode(pt.text)


def attribute_prompt(
    model: LoadedModel, pt: PromptTargets, params: AttributionParams, role: str | None = None
) -> tuple[CompactGraph, Any, dict[str, Any]]:
    """One graph: (compact graph, circuit-tracer Graph or None, info), in ``params.mode``.

    Logits come from the graph's own forward pass. Totals mode has no circuit-tracer Graph
    (no feature-to-feature edges) and no dense adjacency.
    """
    if params.mode == "totals":
        from em_circuits.attribution.totals_graph import totals_prompt  # noqa: PLC0415  # cycle: totals_graph imports this module

        return totals_prompt(model, pt, params)
    return full_prompt(model, pt, params, role)


def salient_ids(pt: PromptTargets, logits: torch.Tensor, n: int) -> list[int]:
    """The ``n`` most probable tokens that are not labeled."""
    if n <= 0:
        return []
    labeled = set(pt.evil_ids) | set(pt.safe_ids)
    ranked = torch.topk(logits.float(), n + len(labeled)).indices.tolist()
    return [t for t in ranked if t not in labeled][:n]


def full_prompt(
    model: LoadedModel, pt: PromptTargets, params: AttributionParams, role: str | None = None
) -> tuple[CompactGraph, Any, dict[str, Any]]:
    """circuit-tracer's ``attribute()`` with feature-to-feature edges over the
    ``params.max_feature_nodes`` most influential features; totals from the linear solve."""
    from circuit_tracer import attribute

    rm = model.replacement
    where = f"prompt {pt.prompt_id}, model {model.slug}"
    ids = prompt_ids(model, pt)
    captured: dict[str, Any] = {}
    original_setup = rm.setup_attribution

    def setup_and_capture(inputs):
        ctx = original_setup(inputs)
        check_context_finite(ctx, where)
        captured["logits"] = ctx.logits[0, -1].detach().float().cpu()
        return ctx

    rows, custom = attribution_targets(model, pt, params, role, ids)
    if not rows:
        raise GraphError(f"{where}: no evil or safe labels, nothing to attribute to")

    started = time.perf_counter()
    rm.setup_attribution = setup_and_capture
    try:
        graph = attribute(
            ids,
            rm,
            attribution_targets=custom,
            batch_size=params.batch_size,
            max_feature_nodes=params.max_feature_nodes,
            offload=params.offload,
        )
    except torch.cuda.OutOfMemoryError as err:
        raise GraphError(
            f"{where}: out of GPU memory ({err}). Lower --batch-size (now {params.batch_size}) or "
            f"use --offload cpu"
        ) from None
    except RuntimeError as err:
        if "converge" in str(err):
            raise GraphError(
                f"{where}: attribution did not converge ({err}); NaN activations or an fp16 "
                f"overflow are the usual cause: try --dtype bfloat16"
            ) from err
        raise
    finally:
        del rm.setup_attribution
    seconds = time.perf_counter() - started

    logits = captured["logits"]
    table, labels = target_table(model, pt, rows, logits)
    selected = graph.selected_features.cpu()
    features = graph.active_features[selected].cpu()
    activations = graph.activation_values[selected].cpu()
    # One copy to the model's device serves the NaN check and the effect maths.
    adjacency = graph.adjacency_matrix.to(model.device)
    _check_adjacency(adjacency, features, graph.cfg.n_layers, graph.n_pos, where)
    top = torch.topk(logits, params.top_k)
    dense = DenseGraph(
        adjacency,
        features,
        activations,
        graph.input_tokens.cpu(),
        graph.cfg.n_layers,
        table,
        top.indices,
        top.values,
    )
    compact = compact_from_dense(
        dense,
        params.edge_keep,
        device=model.device,
        meta={
            "target_labels": labels,
            "prompt_id": pt.prompt_id,
            "mode": "full",
            "features_stored": f"{int(selected.shape[0])} most influential of "
            f"{int(graph.active_features.shape[0])} active",
        },
    )
    info = {
        "dense": dense,
        "seconds": seconds,
        "n_active_features": int(graph.active_features.shape[0]),
        "n_selected_features": int(selected.shape[0]),
        "logits": logits,
    }
    return compact, graph, info


def check_labels_against_graph(
    pt: PromptTargets, role: str, logits: torch.Tensor, dtype: torch.dtype
) -> list[dict[str, Any]]:
    """Labels whose stored logit differs from the graph's: reported, never dropped."""
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    mismatches = []
    for tid, stored in pt.stored_logits.get(role, {}).items():
        now = float(logits[tid])
        if abs(now - stored) > tolerance * max(1.0, abs(stored)):
            mismatches.append(
                {
                    "token_id": tid,
                    "token": pt.token_names.get(tid),
                    "stored_logit": stored,
                    "graph_logit": now,
                }
            )
    return mismatches

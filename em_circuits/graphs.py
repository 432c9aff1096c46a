"""Attribution graphs for labeled prompts: explicit targets, same-pass logits, compact storage.

For a labeled prompt, both the base and the adapted graph attribute to the same targets:

* a contrast target, the direction ``mean_e u_e - mean_s u_s`` over the evil (e) and safe (s)
  tokens' unembedding vectors, whose value is ``mean logit(evil) - mean logit(safe)``;
* every labeled evil and safe token (its demeaned unembedding, value ``logit - mean logit``);
* optionally the most probable other tokens (``salient_logits``).

All are passed to circuit-tracer as custom targets, so a low-probability evil token is a graph
node even when it would fall outside the usual cumulative-probability cut.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from em_circuits.graph_store import (
    GRAPH_FORMAT,
    CompactGraph,
    DenseGraph,
    compact_from_dense,
    content_fingerprint,
    load_compact,
    save_compact,
    save_full,
)
from em_circuits.models import LoadedModel, NonFiniteError
from em_circuits.store import ResultsStore, params_key, read_artifact, write_artifact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttributionParams:
    """Knobs of one graph. Defaults follow the prior art (8192 features, batch 256)."""

    max_feature_nodes: int = 8192
    batch_size: int = 256
    offload: str | None = None
    salient_logits: int = 0
    edge_keep: int = 50_000
    top_k: int = 10

    def cache_fields(self) -> dict[str, Any]:
        # batch size and offload change speed and memory, never the graph.
        fields = asdict(self)
        fields.pop("batch_size")
        fields.pop("offload")
        fields["format"] = GRAPH_FORMAT
        return fields


@dataclass
class PromptTargets:
    """What a prompt's graphs attribute to, from its labels."""

    prompt_id: str
    text: str
    evil_ids: list[int]
    safe_ids: list[int]
    token_names: dict[int, str]
    stored_logits: dict[str, dict[int, float]]  # role -> token id -> logit stored at labeling
    stored_probs: dict[str, dict[int, float]] = field(default_factory=dict)  # role -> id -> p

    def key(self, params: AttributionParams) -> str:
        return params_key(
            {**params.cache_fields(), "evil": sorted(self.evil_ids), "safe": sorted(self.safe_ids)}
        )


class GraphError(RuntimeError):
    """One prompt's graph failed; the run goes on with the next prompt."""


def targets_from_labels(labels: dict[str, Any], text: str) -> PromptTargets:
    """Evil and safe token ids over both lists; the adapted list wins a disagreement."""
    label_of: dict[int, str] = {}
    names: dict[int, str] = {}
    stored: dict[str, dict[int, float]] = {"base": {}, "adapted": {}}
    probs: dict[str, dict[int, float]] = {"base": {}, "adapted": {}}
    for role in ("base", "adapted"):
        for entry in labels["tokens"].get(role, []):
            tid = int(entry["token_id"])
            names[tid] = entry["token"]
            stored[role][tid] = float(entry["logit"])
            probs[role][tid] = float(entry.get("prob", 0.0))
            if entry.get("label") in ("evil", "safe"):
                label_of[tid] = entry["label"]
    return PromptTargets(
        prompt_id=labels["prompt_id"],
        text=text,
        evil_ids=sorted(t for t, lab in label_of.items() if lab == "evil"),
        safe_ids=sorted(t for t, lab in label_of.items() if lab == "safe"),
        token_names=names,
        stored_logits=stored,
        stored_probs=probs,
    )


TargetRow = tuple[str, str, str, int]  # name, kind (token|contrast), label, token id (-1)


def _target_rows(model: LoadedModel, pt: PromptTargets, salient_ids: list[int]) -> list[TargetRow]:
    """The contrast first (when both sets exist), then evil, safe and salient other tokens."""
    rows: list[TargetRow] = []
    if pt.evil_ids and pt.safe_ids:
        rows.append(("evil-safe", "contrast", "contrast", -1))
    labeled = [(t, "evil") for t in pt.evil_ids] + [(t, "safe") for t in pt.safe_ids]
    for tid, label in labeled + [(t, "other") for t in salient_ids]:
        name = pt.token_names.get(tid) or model.tokenizer.decode([tid])
        rows.append((name, "token", label, tid))
    return rows


def _direction(unembed: torch.Tensor, pt: PromptTargets, row: TargetRow) -> torch.Tensor:
    if row[1] == "contrast":
        return unembed[pt.evil_ids].mean(0) - unembed[pt.safe_ids].mean(0)
    return unembed[row[3]] - unembed.mean(0)


def _custom_targets(model: LoadedModel, pt: PromptTargets, rows: list[TargetRow],
                    prob: dict[int, float]) -> list:
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
        targets.append(CustomTarget(row[0], float(weight),
                                    _direction(unembed, pt, row).to(model.dtype)))
    return targets


def _target_table(model: LoadedModel, pt: PromptTargets, rows: list[TargetRow],
                  logits: torch.Tensor) -> tuple[dict[str, Any], list[str]]:
    """What each target's row explains, from the graph pass's own logits."""
    logits = logits.float()
    probs = torch.softmax(logits, -1)
    table: dict[str, list] = {k: [] for k in ("names", "kinds", "token_ids", "values", "logits",
                                              "probs")}
    for name, kind, _label, tid in rows:
        if kind == "contrast":
            evil, safe = torch.tensor(pt.evil_ids), torch.tensor(pt.safe_ids)
            value = logits[evil].mean() - logits[safe].mean()
            logit, prob = float("nan"), probs[evil].sum()
        else:
            value, logit, prob = logits[tid] - logits.mean(), logits[tid], probs[tid]
        table["names"].append(name)
        table["kinds"].append(kind)
        table["token_ids"].append(tid)
        table["values"].append(float(value))
        table["logits"].append(float(logit))
        table["probs"].append(float(prob))
    return table, [row[2] for row in rows]


def _check_context(ctx, where: str) -> None:
    """Name the first layer whose transcoder activations or errors are NaN/Inf."""
    bad_layers = set()
    values = ctx.activation_matrix.coalesce()
    bad = ~torch.isfinite(values.values())
    if bad.any():
        bad_layers.update(values.indices()[0, bad].tolist())
    for layer, err in enumerate(ctx.error_vectors):
        if not torch.isfinite(err).all():
            bad_layers.add(layer)
    if bad_layers:
        raise NonFiniteError(f"{where}: NaN/Inf in the MLP input or output at layer "
                             f"{min(bad_layers)} (transcoder activations or errors)")
    if not torch.isfinite(ctx.logits).all():
        raise NonFiniteError(f"{where}: NaN/Inf in the model's logits (after the last layer)")


def _check_adjacency(adjacency: torch.Tensor, features: torch.Tensor, n_layers: int,
                     n_pos: int, where: str) -> None:
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
    model: LoadedModel, pt: PromptTargets, params: AttributionParams, role: str | None,
    ids: torch.Tensor,
) -> tuple[list[TargetRow], list]:
    """The target rows of a prompt's graph and the circuit-tracer custom targets for them.

    Target weights only rank features while attributing. The probabilities stored at labeling
    time serve; a forward pass is needed only without them, or to pick salient tokens.
    """
    prob = pt.stored_probs.get(role or "", {})
    salient_ids: list[int] = []
    if params.salient_logits or not prob:
        with torch.no_grad():
            plain = torch.softmax(model.hf_model(ids[None]).logits[0, -1].float(), -1).cpu()
        labeled = set(pt.evil_ids) | set(pt.safe_ids)
        ranked = torch.topk(plain, params.salient_logits + len(labeled)).indices.tolist()
        salient_ids = [t for t in ranked if t not in labeled][: params.salient_logits]
        prob = {t: float(plain[t]) for t in [*labeled, *salient_ids]}
    rows = _target_rows(model, pt, salient_ids)
    return rows, (_custom_targets(model, pt, rows, prob) if rows else [])


def attribute_prompt(
    model: LoadedModel, pt: PromptTargets, params: AttributionParams, role: str | None = None
) -> tuple[CompactGraph, Any, dict[str, Any]]:
    """One graph: (compact graph, circuit-tracer Graph, info). Logits come from its own pass."""
    from circuit_tracer import attribute

    rm = model.replacement
    where = f"prompt {pt.prompt_id}, model {model.slug}"
    ids = model.encode(pt.text)
    captured: dict[str, Any] = {}
    original_setup = rm.setup_attribution

    def setup_and_capture(inputs):
        ctx = original_setup(inputs)
        _check_context(ctx, where)
        captured["logits"] = ctx.logits[0, -1].detach().float().cpu()
        return ctx

    rows, custom = attribution_targets(model, pt, params, role, ids)
    if not rows:
        raise GraphError(f"{where}: no evil or safe labels, nothing to attribute to")

    started = time.perf_counter()
    rm.setup_attribution = setup_and_capture
    try:
        graph = attribute(
            ids, rm, attribution_targets=custom, batch_size=params.batch_size,
            max_feature_nodes=params.max_feature_nodes, offload=params.offload,
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
    table, labels = _target_table(model, pt, rows, logits)
    selected = graph.selected_features.cpu()
    features = graph.active_features[selected].cpu()
    activations = graph.activation_values[selected].cpu()
    # One copy to the model's device serves the NaN check and the effect maths.
    adjacency = graph.adjacency_matrix.to(model.device)
    _check_adjacency(adjacency, features, graph.cfg.n_layers, graph.n_pos, where)
    top = torch.topk(logits, params.top_k)
    dense = DenseGraph(adjacency, features, activations, graph.input_tokens.cpu(),
                       graph.cfg.n_layers, table, top.indices, top.values)
    compact = compact_from_dense(dense, params.edge_keep, device=model.device,
                                 meta={"target_labels": labels, "prompt_id": pt.prompt_id})
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
            mismatches.append({"token_id": tid, "token": pt.token_names.get(tid),
                               "stored_logit": stored, "graph_logit": now})
    return mismatches


def cached_graph_meta(store: ResultsStore, slug: str, fp: str, pt: PromptTargets,
                      params: AttributionParams) -> dict[str, Any] | None:
    """The stored graph for these exact model, targets and parameters, if complete."""
    paths = graph_paths(store, slug, pt, params)
    meta = store.load_for_model(paths["meta"], "graph_meta", fp, params_key=pt.key(params))
    if meta is None or not paths["compact"].is_file():
        return None
    return meta


def build_graph(
    store: ResultsStore,
    model: LoadedModel,
    role: str,
    pt: PromptTargets,
    params: AttributionParams,
    save_full_graph: bool = False,
    viewer_dir: Path | None = None,
) -> dict[str, Any]:
    """Compute, check and store one graph; returns its metadata artifact."""
    compact, graph, info = attribute_prompt(model, pt, params, role)
    paths = graph_paths(store, model.slug, pt, params)
    mismatches = check_labels_against_graph(pt, role, info["logits"], model.dtype)
    for m in mismatches:
        log.warning("prompt %s, %s: label for %r was made on logit %.4f, graph has %.4f",
                    pt.prompt_id, model.slug, m["token"], m["stored_logit"], m["graph_logit"])
    compact_bytes = save_compact(compact, paths["compact"])
    full_bytes = None
    if save_full_graph:
        full_bytes = save_full(paths["full"], info["dense"])
    if viewer_dir is not None:
        from em_circuits.viewer import write_viewer_graph

        write_viewer_graph(graph, viewer_dir, pt.prompt_id, role)
    top = [{"token_id": int(t), "token": model.tokenizer.decode([int(t)]), "logit": float(v)}
           for t, v in zip(compact.top_token_ids, compact.top_logits)]
    # The meta file is written last: its presence marks a complete graph.
    return write_artifact(paths["meta"], "graph_meta", {
        "prompt_id": pt.prompt_id,
        "role": role,
        **model.identity(),
        "params_key": pt.key(params),
        "params": asdict(params),
        "targets": [
            {"name": n, "kind": k, "label": lab, "token_id": int(t), "value": float(v),
             "logit": float(lg), "prob": float(p)}
            for n, k, lab, t, v, lg, p in zip(
                compact.target_names, compact.target_kinds, compact.meta["target_labels"],
                compact.target_token_ids, compact.target_values, compact.target_logits,
                compact.target_probs)
        ],
        "top_logits": top,
        "label_check": {"checked": len(pt.stored_logits.get(role, {})), "mismatches": mismatches},
        "files": {"compact": paths["compact"].name, "compact_bytes": compact_bytes,
                  "full": paths["full"].name if full_bytes else None, "full_bytes": full_bytes},
        "graph_fingerprint": content_fingerprint(compact),
        "n_features_active": info["n_active_features"],
        "n_features_selected": info["n_selected_features"],
        "n_pos": compact.n_pos,
        "n_layers": compact.n_layers,
        "seconds": round(info["seconds"], 3),
    })


def load_graph(store: ResultsStore, meta: dict[str, Any]) -> CompactGraph:
    """The compact graph a metadata artifact describes."""
    path = store.graph_dir(meta["model_slug"], meta["prompt_id"]) / meta["files"]["compact"]
    return load_compact(path)


def find_graph_metas(store: ResultsStore, model_slug: str) -> list[dict[str, Any]]:
    """All complete graphs of one model (newest per prompt when parameters differ)."""
    latest: dict[str, dict[str, Any]] = {}
    for path in sorted((store.root / "graphs" / model_slug).glob("*/*.json")):
        meta = read_artifact(path, "graph_meta")
        if not (path.parent / meta["files"]["compact"]).is_file():
            continue
        pid = meta["prompt_id"]
        if pid not in latest or meta["created"] > latest[pid]["created"]:
            latest[pid] = meta
    return [latest[pid] for pid in sorted(latest)]


@dataclass
class StageResult:
    computed: list[str]
    cached: list[str]
    failed: dict[str, str]


def labeled_targets(
    store: ResultsStore, adapted_slug: str, only_evil: bool, prompt_ids: list[str] | None = None
) -> list[PromptTargets]:
    """The prompts to graph: labeled, not rejected, with at least one evil or safe token."""
    from em_circuits.queue import load_labels

    chosen = []
    for labels in load_labels(store, adapted_slug):
        if labels.get("rejected") or (prompt_ids and labels["prompt_id"] not in prompt_ids):
            continue
        pt = targets_from_labels(labels, store.load_prompt(labels["prompt_id"])["text"])
        if only_evil and not pt.evil_ids:
            continue
        if pt.evil_ids or pt.safe_ids:
            chosen.append(pt)
    return chosen


def run_graph_stage(
    store: ResultsStore,
    specs: dict[str, Any],
    targets: list[PromptTargets],
    params: AttributionParams,
    device: torch.device | str,
    force: bool = False,
    save_full_graph: bool = False,
    viewer_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, StageResult]:
    """Graphs for every prompt, one model at a time: each model is loaded once, then freed.

    Under ``accelerate launch`` each process takes every n-th prompt and the call returns when
    all processes are done; each result then lists that process's prompts only.
    """
    from tqdm import tqdm

    from em_circuits.distributed import current_shard
    from em_circuits.models import fingerprint, load_model, model_slug, release

    shard = current_shard()
    targets = shard.take(targets)
    results: dict[str, StageResult] = {}
    for role, spec in specs.items():
        result = StageResult([], [], {})
        results[role] = result
        fp = fingerprint(spec, device)
        slug = model_slug(spec, fp)
        todo = []
        for pt in targets:
            if not force and cached_graph_meta(store, slug, fp, pt, params) is not None:
                result.cached.append(pt.prompt_id)
            else:
                todo.append(pt)
        if not todo:
            log.info("%s: all %d graphs cached", slug, len(result.cached))
            continue
        model = load_model(spec, device, store.merged_cache_dir)
        try:
            for pt in tqdm(todo, desc=f"graphs {role}", disable=not progress, unit="prompt"):
                try:
                    build_graph(store, model, role, pt, params, save_full_graph, viewer_dir)
                    result.computed.append(pt.prompt_id)
                except (GraphError, NonFiniteError) as err:
                    log.error("skipping: %s", err)
                    result.failed[pt.prompt_id] = str(err)
        finally:
            release(model)
    shard.wait()
    return results


def graph_paths(store: ResultsStore, slug: str, pt: PromptTargets,
                         params: AttributionParams) -> dict[str, Path]:
    directory = store.graph_dir(slug, pt.prompt_id)
    key = pt.key(params)
    return {"compact": directory / f"{key}.safetensors", "meta": directory / f"{key}.json",
            "full": directory / f"{key}.full.safetensors"}

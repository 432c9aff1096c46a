"""Look inside a stored graph: node counts, tensors, NaN checks, top edges, targets, logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from em_circuits.attribution.storage import CompactGraph
from em_circuits.attribution.storage_full import load_any
from em_circuits.core.schemas import GraphMetaRecord
from em_circuits.core.store import ArtifactError, ResultsStore, read_artifact


def node_label(graph: CompactGraph, index: int) -> tuple[str, str]:
    """(node type, readable name) of a node index in the adjacency's order."""
    if index < graph.n_features:
        layer, pos, feat = graph.features[index].tolist()
        return "feature", f"feature L{layer} F{feat} @pos{pos}"
    if index < graph.error_slice.stop:
        layer, pos = divmod(index - graph.n_features, graph.n_pos)
        return "error", f"error L{layer} @pos{pos}"
    if index < graph.n_sources:
        pos = index - graph.token_slice.start
        return "token", f"token @pos{pos} (id {int(graph.input_tokens[pos])})"
    target = index - graph.n_sources
    return "target", f"target {graph.target_names[target]!r}"


def top_edges(graph: CompactGraph, per_pair: int = 5) -> dict[str, list[dict[str, Any]]]:
    """The strongest stored edges for each (source type -> target type) pair."""
    pairs: dict[str, list[dict[str, Any]]] = {}
    order = torch.argsort(graph.edge_weight.float().abs(), descending=True)
    for i in order.tolist():
        row, col = graph.edge_index[:, i].tolist()
        src_type, src = node_label(graph, col)
        dst_type, dst = node_label(graph, row)
        bucket = pairs.setdefault(f"{src_type} -> {dst_type}", [])
        if len(bucket) < per_pair:
            bucket.append({"source": src, "target": dst, "weight": float(graph.edge_weight[i])})
    return pairs


def _tensor_summary(graph: CompactGraph) -> dict[str, dict[str, Any]]:
    out = {}
    for name in (
        "features",
        "activations",
        "input_tokens",
        "direct",
        "total",
        "target_values",
        "target_logits",
        "top_logits",
        "edge_index",
        "edge_weight",
    ):
        tensor = getattr(graph, name)
        finite = bool(torch.isfinite(tensor.float()).all()) if tensor.numel() else True
        if name == "target_logits":  # direction targets have no logit by design
            finite = bool(torch.isfinite(tensor[tensor == tensor]).all())
        out[name] = {
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "finite": finite,
        }
    return out


def _find_meta(path: Path) -> GraphMetaRecord | None:
    meta_path = ResultsStore.graph_meta_path_for(path)
    return read_artifact(meta_path, "graph_meta") if meta_path.is_file() else None


def _logits_check(
    graph: CompactGraph, meta: GraphMetaRecord | None, store: ResultsStore | None
) -> dict[str, Any]:
    """Do the logits stored for labeling equal the logits of the graph's own forward pass?"""
    graph_logit = dict(zip(graph.top_token_ids.tolist(), graph.top_logits.tolist()))
    for tid, logit in zip(graph.target_token_ids.tolist(), graph.target_logits.tolist()):
        if tid >= 0:
            graph_logit.setdefault(tid, logit)
    result: dict[str, Any] = {"compared": 0, "max_abs_diff": None, "source": None}
    if meta is None or store is None:
        return result
    path = store.logits_path(meta["model_slug"], meta["prompt_id"])
    if not path.is_file():
        result["source"] = f"no labeling logits at {path}"
        return result
    stored = read_artifact(path, "logits")
    diffs = [
        abs(e["logit"] - graph_logit[e["token_id"]])
        for e in stored["top_k"]
        if e["token_id"] in graph_logit
    ]
    result.update(compared=len(diffs), max_abs_diff=max(diffs) if diffs else None, source=str(path))
    result["mismatched"] = meta.get("label_check", {}).get("mismatches", [])
    return result


def inspect_graph(
    path: Path, store: ResultsStore | None = None, edges_per_pair: int = 5, top_features: int = 10
) -> dict[str, Any]:
    """A readable, JSON-able description of one stored graph file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "no such graph file")
    graph = load_any(path)
    meta = _find_meta(path)
    sizes = {p.name: p.stat().st_size for p in ResultsStore.graph_family(path)}
    contrast = graph.contrast_index()
    ranking_row = contrast if contrast is not None else 0
    ranked = torch.argsort(graph.total[ranking_row, : graph.n_features].abs(), descending=True)
    return {
        "file": str(path),
        "format": "full" if path.name.endswith(".full.safetensors") else "compact",
        "mode": graph.meta.get("mode", "full"),
        "features_stored": graph.meta.get("features_stored"),
        "prompt_id": None if meta is None else meta.get("prompt_id"),
        "model": None if meta is None else meta.get("model_slug"),
        "nodes": {
            "features": graph.n_features,
            "errors": graph.n_errors,
            "tokens": graph.n_pos,
            "targets": len(graph.target_names),
            "stored_edges": int(graph.edge_weight.numel()),
        },
        "tensors": _tensor_summary(graph),
        "bytes_on_disk": sizes,
        "finite": all(t["finite"] for t in _tensor_summary(graph).values()),
        "targets": [
            {
                "name": n,
                "kind": k,
                "token_id": int(t),
                "logit": float(lg),
                "prob": float(p),
                "value": float(v),
                "sum_direct": float(d),
                "bias": float(b),
            }
            for n, k, t, lg, p, v, d, b in zip(
                graph.target_names,
                graph.target_kinds,
                graph.target_token_ids,
                graph.target_logits,
                graph.target_probs,
                graph.target_values,
                graph.direct.sum(1),
                graph.bias,
            )
        ],
        "top_features": [
            {
                "node": int(i),
                "layer": int(graph.features[i, 0]),
                "position": int(graph.features[i, 1]),
                "feature_id": int(graph.features[i, 2]),
                "activation": float(graph.activations[i]),
                "total_effect": float(graph.total[ranking_row, i]),
                "direct_effect": float(graph.direct[ranking_row, i]),
            }
            for i in ranked[:top_features].tolist()
        ],
        "top_edges": top_edges(graph, edges_per_pair),
        "logits_check": _logits_check(graph, meta, store),
    }


def format_inspection(info: dict[str, Any]) -> str:
    """Plain-text rendering for the terminal."""
    lines = [
        f"graph {info['file']} ({info['format']}, {info['mode']} mode: "
        f"{info['features_stored'] or 'features kept'})",
        f"prompt {info['prompt_id']}  model {info['model']}",
        "nodes: " + ", ".join(f"{k} {v}" for k, v in info["nodes"].items()),
        "finite: " + ("yes" if info["finite"] else "NO - NaN/Inf present"),
        "files: " + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in info["bytes_on_disk"].items()),
        "",
        "tensors:",
    ]
    for name, t in info["tensors"].items():
        flag = "" if t["finite"] else "  <-- NaN/Inf"
        lines.append(f"  {name:<14} {str(t['shape']):<16} {t['dtype']}{flag}")
    lines += ["", "targets (value = demeaned logit or contrast; bias = value - sum of direct):"]
    for t in info["targets"]:
        lines.append(
            f"  {t['name']!r:<14} {t['kind']:<8} id {t['token_id']:>6}  logit "
            f"{t['logit']:8.3f}  p {t['prob']:.4f}  value {t['value']:8.3f}  "
            f"bias {t['bias']:8.3f}"
        )
    lines += ["", "top features by |total effect| on the contrast (or first) target:"]
    for f in info["top_features"]:
        lines.append(
            f"  L{f['layer']:<3} F{f['feature_id']:<8} pos {f['position']:<3} act "
            f"{f['activation']:8.3f}  total {f['total_effect']:+.4f}  direct "
            f"{f['direct_effect']:+.4f}"
        )
    lines += ["", "top edges by node-type pair:"]
    if not info["top_edges"]:
        lines.append(
            f"  none stored ({info['mode']} graph: effects on the targets only); "
            f"`em-circuits graphs --full-graphs {info['prompt_id']}` adds its full graph"
        )
    for pair, edges in sorted(info["top_edges"].items()):
        lines.append(f"  {pair}")
        for e in edges:
            lines.append(f"    {e['weight']:+9.4f}  {e['source']}  ->  {e['target']}")
    check = info["logits_check"]
    lines.append("")
    if check["compared"]:
        lines.append(
            f"labeling logits vs graph logits: {check['compared']} tokens compared, max "
            f"|diff| {check['max_abs_diff']:.3g} ({check['source']})"
        )
    else:
        lines.append(f"labeling logits vs graph logits: not compared ({check['source']})")
    for m in check.get("mismatched", []):
        lines.append(
            f"  MISMATCH {m['token']!r}: labeled at {m['stored_logit']:.4f}, graph "
            f"{m['graph_logit']:.4f}"
        )
    return "\n".join(lines)

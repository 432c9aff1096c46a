"""Adapter nodes in the viewer's graphs: the adapter nodes with the largest total effects on
the contrast drawn into a frontend graph as nodes of their own type, with their strongest
links (:func:`add_adapter_nodes`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from em_circuits.attribution.viewer_metadata import FEATURE_NODE, node_feature

if TYPE_CHECKING:
    from em_circuits.attribution.adapter_nodes import AdapterDetail

#: The node type of an adapter node (attribution.adapter_nodes) in the adapted graphs.
ADAPTER_NODE = "lora adapter"

#: Adapter nodes drawn per graph: those with the largest total effects on the contrast.
ADAPTER_NODES_SHOWN = 8

#: Strongest links into and out of each drawn adapter node to features and embeddings (its
#: links to the logit targets are all drawn).
ADAPTER_LINKS_SHOWN = 10


def adapter_node_name(layer: int, module: str, component: int) -> str:
    """The one name of an adapter component: ``LoRA L2 down_proj #0``."""
    return f"LoRA L{int(layer)} {module} #{int(component)}"


def add_adapter_nodes(
    data: dict[str, Any], adapter: AdapterDetail, shown: int = ADAPTER_NODES_SHOWN
) -> int:
    """Draw ``adapter``'s adapter nodes with the largest total effects on its contrast into
    the frontend graph ``data`` of the same prompt, as nodes of type :data:`ADAPTER_NODE` at
    their layer and position, linked to the drawn logit targets (their direct effects), to
    the drawn features they write into (their edges into those features' pre-activations)
    and from the drawn features and token embeddings they read (for the nodes whose reads
    were computed). The effects come from the totals graph with adapter nodes, where the
    adapter's writes are taken out of the errors and attention; the graph's other edges are
    those of the graph drawn. Returns how many were drawn."""
    if "contrast" not in adapter.target_kinds or not len(adapter.nodes):
        return 0
    contrast = adapter.target_kinds.index("contrast")
    modules = adapter.modules
    strength = adapter.total[contrast].abs()
    chosen = [int(i) for i in strength.argsort(descending=True)[:shown] if strength[i] > 0]
    nodes = data["nodes"]
    drawn_features = {
        (int(n["layer"]), node_feature(n)[1], int(n["ctx_idx"])): n["node_id"]
        for n in nodes
        if n["feature_type"] == FEATURE_NODE
    }
    embeddings = {
        int(n["ctx_idx"]): n["node_id"] for n in nodes if n["feature_type"] == "embedding"
    }
    logits = _logit_nodes(nodes, adapter)
    feature_index = {
        (layer, feature, pos): i
        for i, (layer, pos, feature) in enumerate(adapter.features.tolist())
    }
    edge_rows = _positions(adapter.edge_features)  # feature index -> row of the edges
    read_rows = _positions(adapter.read_nodes)  # adapter node -> row of the reads
    links = data["links"]
    n_pos = len(data["metadata"].get("prompt_tokens") or []) or adapter.n_pos
    token_start = adapter.n_sources - adapter.n_pos
    for i in chosen:
        layer, code, component, pos = (int(v) for v in adapter.nodes[i].tolist())
        module = modules[code] if code < len(modules) else str(code)
        node_id = f"A{layer}_{code * 10_000 + component}_{pos}"
        nodes.append(
            {
                "node_id": node_id,
                "feature": -2 - i,
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": ADAPTER_NODE,
                "token_prob": 0.0,
                "is_target_logit": False,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "jsNodeId": f"A{layer}_{code * 10_000 + component}-{n_pos - pos}",
                "clerp": f"{adapter_node_name(layer, module, component)} "
                f"(total {float(adapter.total[contrast, i]):+.2f} on evil − safe)",
                "influence": 0.0,
                "activation": float(adapter.activations[i]),
            }
        )
        for row, logit_id in logits.items():
            links.append(_link(node_id, logit_id, adapter.direct[row, i]))
        writes, reads = [], []
        if adapter.edges is not None:
            for (f_layer, feature, f_pos), feature_id in drawn_features.items():
                k = edge_rows.get(feature_index.get((f_layer, feature, f_pos), -1))
                if k is not None:
                    writes.append(_link(node_id, feature_id, adapter.edges[k, i]))
        r = read_rows.get(i)
        if r is not None and adapter.reads is not None:
            row_reads = adapter.reads[r]
            for (f_layer, feature, f_pos), feature_id in drawn_features.items():
                index = feature_index.get((f_layer, feature, f_pos))
                if index is not None:
                    reads.append(_link(feature_id, node_id, row_reads[index]))
            for e_pos, embedding_id in embeddings.items():
                reads.append(_link(embedding_id, node_id, row_reads[token_start + e_pos]))
        links += _strongest(writes) + _strongest(reads)
    data["links"] = [link for link in links if link is not None]
    data["metadata"]["adapter_nodes"] = {
        "drawn": len(chosen),
        "of": len(adapter.nodes),
        "source": "totals graph of the same prompt with adapter nodes",
    }
    return len(chosen)


def _positions(index: Any) -> dict[int, int]:
    """{value: its position} of a 1-D index tensor (empty for None)."""
    return {} if index is None else {int(v): k for k, v in enumerate(index.tolist())}


def _strongest(links: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The :data:`ADAPTER_LINKS_SHOWN` links of largest absolute weight."""
    kept = [link for link in links if link is not None]
    return sorted(kept, key=lambda link: -abs(link["weight"]))[:ADAPTER_LINKS_SHOWN]


def _link(source: str, target: str, weight: Any) -> dict[str, Any] | None:
    value = float(weight)
    return {"source": source, "target": target, "weight": value} if value != 0 else None


def _logit_nodes(nodes: list[dict[str, Any]], adapter: AdapterDetail) -> dict[int, str]:
    """Target row -> drawn logit node id: the contrast by its name, tokens by their id."""
    out = {}
    for row, (kind, token) in enumerate(zip(adapter.target_kinds, adapter.target_token_ids)):
        for node in nodes:
            if node["feature_type"] != "logit":
                continue
            if kind == "contrast" and "evil − safe" in (node.get("clerp") or ""):
                out[row] = node["node_id"]
            elif kind == "token" and int(node["feature"]) == int(token):
                out[row] = node["node_id"]
    return out

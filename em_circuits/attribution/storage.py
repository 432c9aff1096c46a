"""Compact, shareable storage of attribution graphs, and the effect maths stored in them.

A circuit-tracer ``Graph`` holds a dense adjacency ``A`` (rows = targets, columns = sources)
over the nodes ``[selected features | error nodes (layer-major) | token nodes | logit targets]``;
at Llama-3.2-1B scale it is ~290 MB. The feature analysis needs much less, and we store
exactly that, losslessly, in one safetensors file (no pickle: safe to share):

* the node table: (layer, position, transcoder feature id) and activation of each feature;
* for every target t and every source node s (features, errors, tokens):
    - ``direct[t, s] = A[t, s]``, the direct effect of s on t in the linearised model;
    - ``total[t, s]``, the total (multi-hop) effect through every path of features (below);
* the target value each row explains, and its bias term ``value - sum_s direct[t, s]``;
* a pruned sparse adjacency (half precision) for the viewer and edge inspection.

Total effects. Let F be the selected features with activations a_f. A feature's out-edges
scale with its activation, so a change delta in a_f changes its effect on node g by
``A[g, f] * delta / a_f``; errors and tokens are fixed inputs of the linearised model. With
``B = A[:, F] diag(1/a_F)``, the total effect of source s on target t is

    total[t, s]  = A[t, s] + sum_f B[t, f] total_f[s]
    total_f[s]   = A[f, s] + sum_g B[f, g] total_g[s]

i.e. ``total_T = A_T + B_TF (I - B_FF)^-1 A_F``. A feature reads its layer's MLP input and
writes the MLP output, so B_FF only links lower to higher layers: it is nilpotent and the
Neumann series ``sum_k B_TF B_FF^k`` ends after ``n_layers`` terms, exactly.
Total effects of the roots (tokens, errors) then sum, with the biases, to the target value;
a feature's total effect is the linearised logit change from zeroing it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from em_circuits.attribution.graph_format import GRAPH_FORMAT, READABLE_GRAPH_FORMATS
from em_circuits.core.atomic import atomic_path
from em_circuits.core.store import ArtifactError


@dataclass
class CompactGraph:
    """Everything the feature analysis reads, for one prompt and one model."""

    features: torch.Tensor  # (n_features, 3) int64: layer, position, transcoder feature id
    activations: torch.Tensor  # (n_features,) float32
    input_tokens: torch.Tensor  # (n_pos,) int64
    n_layers: int
    direct: torch.Tensor  # (n_targets, n_sources) float32
    total: torch.Tensor  # (n_targets, n_sources) float32
    target_values: torch.Tensor  # (n_targets,) the demeaned logit (direction) each row explains
    target_token_ids: torch.Tensor  # (n_targets,) vocab id, or -1 for a direction target
    target_logits: torch.Tensor  # (n_targets,) model logit of the token (nan for directions)
    target_probs: torch.Tensor  # (n_targets,)
    target_names: list[str]  # token strings, or e.g. "evil-safe"
    target_kinds: list[str]  # "token" or "contrast"
    top_token_ids: torch.Tensor  # (k,) the graph forward's own top-k next tokens
    top_logits: torch.Tensor  # (k,)
    edge_index: torch.Tensor = field(default_factory=lambda: torch.zeros(2, 0, dtype=torch.int32))
    edge_weight: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float16))
    meta: dict[str, Any] = field(default_factory=dict)
    #: Adapter nodes (attribution.adapter_nodes), outside the source layout: (n, 4) int64
    #: layer, module code (meta["adapter_modules"]), component, position; their activations
    #: and their direct and total effects on each target. The error columns then hold what
    #: the adapter nodes at their layer and position do not.
    adapter_nodes: torch.Tensor = field(
        default_factory=lambda: torch.zeros(0, 4, dtype=torch.int64)
    )
    adapter_activations: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    adapter_direct: torch.Tensor | None = None  # (n_targets, n_adapter_nodes)
    adapter_total: torch.Tensor | None = None
    #: (k,) int64 indices into ``features`` (those with the largest total effects on the
    #: contrast) and (k,) float32: the adapter nodes' summed direct effect on each one's
    #: pre-activation (their summed edge into it)
    adapter_edge_features: torch.Tensor | None = None
    adapter_edge_sums: torch.Tensor | None = None
    #: (m,) int64 indices into the adapter nodes whose reads were computed (the linear nodes
    #: with the largest total effects on the contrast); (n_features,) float32 each: every
    #: feature's summed edge into them, and that edge times each node's total effect on the
    #: contrast per unit of its activation, summed (the part of their effect it sends
    #: through them). meta["adapter_split"] holds the same sums over every source and over
    #: the adapter nodes.
    adapter_read_nodes: torch.Tensor | None = None
    adapter_read_edges: torch.Tensor | None = None
    adapter_read_via: torch.Tensor | None = None
    #: (n_targets, n_layers): the direct effect of each layer's MLP write at BOS (no node's)
    bos_mlp: torch.Tensor | None = None

    # -- node layout ------------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.input_tokens.shape[0])

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_sources(self) -> int:
        return self.n_features + self.n_errors + self.n_pos

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_errors)

    @property
    def token_slice(self) -> slice:
        return slice(self.n_features + self.n_errors, self.n_sources)

    def error_node(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    @property
    def n_adapter_nodes(self) -> int:
        return int(self.adapter_nodes.shape[0])

    @property
    def bias(self) -> torch.Tensor:
        """Per target: the part of its value no node explains (transcoder biases, BOS)."""
        explained = self.direct.sum(dim=1)
        if self.adapter_direct is not None and self.n_adapter_nodes:
            explained = explained + self.adapter_direct.sum(dim=1)
        return self.target_values - explained

    def contrast_index(self) -> int | None:
        return self.target_kinds.index("contrast") if "contrast" in self.target_kinds else None


#: The optional adapter-node tensors of a graph (present when computed).
ADAPTER_DETAIL_FIELDS = (
    "adapter_edge_features",
    "adapter_edge_sums",
    "adapter_read_nodes",
    "adapter_read_edges",
    "adapter_read_via",
)


def content_fingerprint(graph: CompactGraph) -> str:
    """sha256 of a graph's content (not its file bytes: safetensors orders metadata freely)."""
    digest = hashlib.sha256()
    for tensor in (
        graph.features,
        graph.activations,
        graph.input_tokens,
        graph.direct,
        graph.total,
        graph.target_values,
        graph.target_token_ids,
    ):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if graph.n_adapter_nodes:  # absent from graphs without adapter nodes: their hashes stay
        for part in (graph.adapter_nodes, graph.adapter_direct, graph.adapter_total):
            assert part is not None
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        for part in (
            graph.adapter_edge_features,
            graph.adapter_edge_sums,
            graph.adapter_read_nodes,
            graph.adapter_read_edges,
            graph.adapter_read_via,
        ):
            if part is not None:
                digest.update(part.detach().cpu().contiguous().numpy().tobytes())
    if graph.bos_mlp is not None:  # absent from older graphs: their hashes stay
        digest.update(graph.bos_mlp.detach().cpu().float().contiguous().numpy().tobytes())
    labels = graph.meta.get("target_labels")
    digest.update(repr((graph.n_layers, graph.target_names, graph.target_kinds, labels)).encode())
    return digest.hexdigest()


def total_effects(
    adjacency: torch.Tensor,
    n_features: int,
    n_sources: int,
    activations: torch.Tensor,
    n_layers: int,
    target_rows: torch.Tensor,
) -> torch.Tensor:
    """Total effects of the first ``n_sources`` nodes on the given target rows.

    ``adjacency`` is circuit-tracer's square matrix (rows = targets, columns = sources);
    ``activations`` are those of its first ``n_features`` nodes. See the module docstring.
    """
    a = adjacency.float()
    active = activations.abs() > 0
    scale = torch.where(active, 1.0 / torch.where(active, activations.float(), 1.0), 0.0)
    b_ff = a[:n_features, :n_features] * scale[None, :]
    b_tf = a[target_rows, :n_features] * scale[None, :]
    # y = sum_k B_TF B_FF^k: the per-unit-activation total effect of each feature on each target.
    term = b_tf
    y = b_tf.clone()
    for _ in range(n_layers):
        term = term @ b_ff
        if not term.any():
            break
        y += term
    else:
        if term.any():
            raise ValueError("feature-to-feature edges contain a cycle; graph is malformed")
    return a[target_rows, :n_sources] + y @ a[:n_features, :n_sources]


def prune_edges(direct_full: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` strongest edges by |weight| as (2, n) indices (row=target, col=source)."""
    flat = direct_full.abs().flatten()
    keep = min(keep, int((flat > 0).sum()))
    if keep == 0:
        return torch.zeros(2, 0, dtype=torch.int32), torch.zeros(0, dtype=torch.float16)
    top = torch.topk(flat, keep).indices
    rows = top // direct_full.shape[1]
    cols = top % direct_full.shape[1]
    index = torch.stack([rows, cols]).to(torch.int32).cpu()
    return index, direct_full[rows, cols].to(torch.float16).cpu()


# -- files ------------------------------------------------------------------------------------
def save_compact(graph: CompactGraph, path: Path) -> int:
    """Atomically write one graph; returns the file size in bytes."""
    return write_compact(graph, path)[0]


def write_compact(graph: CompactGraph, path: Path) -> tuple[int, str]:
    """Atomically write one graph; returns the file's size in bytes and its sha256, hashed
    from the bytes in memory (at 2,048 tokens a graph file is hundreds of MB: reading it back
    to hash it cost as much as writing it)."""
    return write_bytes_hashed(path, serialize_compact(graph))


def write_bytes_hashed(path: Path, data: bytes) -> tuple[int, str]:
    """Atomically write ``data``; returns its size and sha256. Hashing and writing run
    without the interpreter lock, so a thread can do this while the GPU computes."""
    digest = hashlib.sha256(data).hexdigest()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return len(data), digest


def serialize_compact(graph: CompactGraph) -> bytes:
    """A graph's file bytes (safetensors, the format :func:`load_compact` reads)."""
    tensors = {
        "features": graph.features.to(torch.int64).contiguous(),
        "activations": graph.activations.float().contiguous(),
        "input_tokens": graph.input_tokens.to(torch.int64).contiguous(),
        "direct": graph.direct.float().contiguous(),
        "total": graph.total.float().contiguous(),
        "target_values": graph.target_values.float().contiguous(),
        "target_token_ids": graph.target_token_ids.to(torch.int64).contiguous(),
        "target_logits": graph.target_logits.float().contiguous(),
        "target_probs": graph.target_probs.float().contiguous(),
        "top_token_ids": graph.top_token_ids.to(torch.int64).contiguous(),
        "top_logits": graph.top_logits.float().contiguous(),
        "edge_index": graph.edge_index.to(torch.int32).contiguous(),
        "edge_weight": graph.edge_weight.to(torch.float16).contiguous(),
    }
    if graph.n_adapter_nodes:
        assert graph.adapter_direct is not None and graph.adapter_total is not None
        # int32 on disk: layer, module, component and position are small; int64 in memory
        tensors["adapter_nodes"] = graph.adapter_nodes.to(torch.int32).contiguous()
        tensors["adapter_activations"] = graph.adapter_activations.float().contiguous()
        tensors["adapter_direct"] = graph.adapter_direct.float().contiguous()
        tensors["adapter_total"] = graph.adapter_total.float().contiguous()
        for name in ADAPTER_DETAIL_FIELDS:
            value = getattr(graph, name)
            if value is not None:
                tensors[name] = value.contiguous()
    tensors |= {} if graph.bos_mlp is None else {"bos_mlp": graph.bos_mlp.float().contiguous()}
    header = {
        "format": GRAPH_FORMAT,
        "n_layers": str(graph.n_layers),
        "target_names": json.dumps(graph.target_names, ensure_ascii=False),
        "target_kinds": json.dumps(graph.target_kinds),
        "meta": json.dumps(graph.meta, ensure_ascii=False, default=str),
    }
    return save(tensors, metadata=header)


def load_compact(path: Path) -> CompactGraph:
    """Load a graph written by :func:`save_compact`; raises ArtifactError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "graph file not found", "run `em-circuits graphs`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:
        raise ArtifactError(
            path,
            f"not a readable safetensors file ({err})",
            "delete it and re-run `em-circuits graphs`",
        ) from None
    if header.get("format") not in READABLE_GRAPH_FORMATS:
        raise ArtifactError(
            path,
            f"unknown graph format {header.get('format')!r}",
            f"expected {GRAPH_FORMAT}; re-run `em-circuits graphs` --force",
        )
    return CompactGraph(
        features=tensors["features"],
        activations=tensors["activations"],
        input_tokens=tensors["input_tokens"],
        n_layers=int(header["n_layers"]),
        direct=tensors["direct"],
        total=tensors["total"],
        target_values=tensors["target_values"],
        target_token_ids=tensors["target_token_ids"],
        target_logits=tensors["target_logits"],
        target_probs=tensors["target_probs"],
        target_names=json.loads(header["target_names"]),
        target_kinds=json.loads(header["target_kinds"]),
        top_token_ids=tensors["top_token_ids"],
        top_logits=tensors["top_logits"],
        edge_index=tensors["edge_index"],
        edge_weight=tensors["edge_weight"],
        meta=json.loads(header.get("meta", "{}")),
        bos_mlp=tensors.get("bos_mlp"),
        **_adapter_fields(tensors),
    )


def _adapter_fields(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    if "adapter_nodes" not in tensors:
        return {}
    names = ("adapter_activations", "adapter_direct", "adapter_total")
    return (
        {"adapter_nodes": tensors["adapter_nodes"].long()}
        | {name: tensors[name] for name in names}
        | {name: tensors[name] for name in ADAPTER_DETAIL_FIELDS if name in tensors}
    )


def target_fields(targets: dict[str, Any]) -> dict[str, Any]:
    """The CompactGraph fields of a target table (lists ``names``, ``kinds``, ``token_ids``,
    ``values``, ``logits``, ``probs``), however the graph was made."""
    return {
        "target_values": torch.tensor(targets["values"], dtype=torch.float32),
        "target_token_ids": torch.tensor(targets["token_ids"], dtype=torch.long),
        "target_logits": torch.tensor(targets["logits"], dtype=torch.float32),
        "target_probs": torch.tensor(targets["probs"], dtype=torch.float32),
        "target_names": list(targets["names"]),
        "target_kinds": list(targets["kinds"]),
    }

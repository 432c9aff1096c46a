"""The full-mode graph: circuit-tracer's dense adjacency, its reduction to the
:class:`~em_circuits.attribution.storage.CompactGraph` every analysis reads, and the
``--save-full`` file that keeps the adjacency (safetensors, never pickle)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from em_circuits.attribution.storage import (
    CompactGraph,
    load_compact,
    prune_edges,
    target_fields,
    total_effects,
)
from em_circuits.core.atomic import atomic_path
from em_circuits.core.store import ArtifactError


@dataclass
class DenseGraph:
    """What a CompactGraph is made from: circuit-tracer's dense adjacency, the selected
    features, and the target table (lists ``names``, ``kinds``, ``token_ids``, ``values``,
    ``logits``, ``probs``) with the graph pass's own top logits."""

    adjacency: torch.Tensor
    features: torch.Tensor
    activations: torch.Tensor
    input_tokens: torch.Tensor
    n_layers: int
    targets: dict[str, Any]
    top_token_ids: torch.Tensor
    top_logits: torch.Tensor


def compact_from_dense(
    dense: DenseGraph,
    edge_keep: int,
    meta: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> CompactGraph:
    """Reduce a dense graph to a CompactGraph (maths on ``device``).

    The one conversion used both at graph time and when reading a ``--save-full`` file, so
    the compact and full formats give identical analysis inputs.
    """
    n_features = int(dense.features.shape[0])
    n_pos = int(dense.input_tokens.shape[0])
    n_sources = n_features + (dense.n_layers + 1) * n_pos
    targets = dense.targets
    n_targets = len(targets["names"])
    if dense.adjacency.shape != (n_sources + n_targets, n_sources + n_targets):
        raise ValueError(
            f"adjacency shape {tuple(dense.adjacency.shape)} does not match {n_features} "
            f"features, {dense.n_layers} layers x {n_pos} positions and {n_targets} targets"
        )
    rows = torch.arange(n_sources, n_sources + n_targets, device=device)
    a = dense.adjacency.to(device=device, dtype=torch.float32)
    edge_index, edge_weight = prune_edges(a[:, :n_sources], edge_keep)
    total = total_effects(
        a, n_features, n_sources, dense.activations.to(device), dense.n_layers, rows
    )
    return CompactGraph(
        features=dense.features.long().cpu(),
        activations=dense.activations.float().cpu(),
        input_tokens=dense.input_tokens.long().cpu(),
        n_layers=dense.n_layers,
        direct=a[rows, :n_sources].cpu(),
        total=total.cpu(),
        **target_fields(targets),
        top_token_ids=dense.top_token_ids.long().cpu(),
        top_logits=dense.top_logits.float().cpu(),
        edge_index=edge_index,
        edge_weight=edge_weight,
        meta=dict(meta or {}),
    )


FULL_FORMAT = "em_circuits.full_graph/1"
_FULL_TENSORS = (
    "adjacency",
    "features",
    "activations",
    "input_tokens",
    "top_token_ids",
    "top_logits",
)


def save_full(path: Path, dense: DenseGraph) -> int:
    """The dense graph, as safetensors (never pickle), for ``--save-full``."""
    tensors = {name: getattr(dense, name).contiguous().cpu() for name in _FULL_TENSORS}
    header = {
        "format": FULL_FORMAT,
        "n_layers": str(dense.n_layers),
        "targets": json.dumps(dense.targets, ensure_ascii=False, default=float),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path).stat().st_size


def load_full(path: Path, edge_keep: int, meta: dict[str, Any] | None = None) -> CompactGraph:
    """Read a full graph and reduce it exactly as at graph time."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(
            path, "full graph file not found", "run `em-circuits graphs --save-full`"
        )
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    if header.get("format") != FULL_FORMAT:
        raise ArtifactError(path, f"unknown full-graph format {header.get('format')!r}")
    tensors = load_file(str(path))
    dense = DenseGraph(
        n_layers=int(header["n_layers"]),
        targets=json.loads(header["targets"]),
        **{name: tensors[name] for name in _FULL_TENSORS},
    )
    return compact_from_dense(dense, edge_keep, meta)


def load_any(path: Path, edge_keep: int = 50_000) -> CompactGraph:
    """Load a compact or a full graph file by its name."""
    if str(path).endswith(".full.safetensors"):
        return load_full(path, edge_keep)
    return load_compact(path)

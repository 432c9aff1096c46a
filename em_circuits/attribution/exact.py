"""What every totals engine returns, and what it requires of the transcoders.

Both engines (circuit-tracer's nnsight context in :mod:`~em_circuits.attribution.totals`,
plain PyTorch in :mod:`~em_circuits.attribution.engine`) fill one :class:`ExactEffects` per
prompt, in circuit-tracer's node layout. Total effects propagate through a feature as
through a linear node only where its activation has slope 1 wherever it is active
(:func:`check_unit_slope`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from em_circuits.models.spec import ModelLoadError

#: Activation functions whose derivative is 1 wherever the feature is active.
UNIT_SLOPE_ACTIVATIONS = ("relu", "jumprelu", "topk", "relutopk")  # relutopk: sparsify's


class UnsupportedTranscoderError(ModelLoadError):
    """A transcoder whose activation function totals mode cannot differentiate exactly."""


@dataclass
class ExactEffects:
    """One prompt's exact effects on its targets, in circuit-tracer's node layout."""

    features: torch.Tensor  # (n_active, 3) int64: layer, position, transcoder feature id
    activations: torch.Tensor  # (n_active,) float32
    direct: torch.Tensor  # (n_targets, n_sources) float32
    total: torch.Tensor  # (n_targets, n_sources) float32
    logits: torch.Tensor  # (vocab,) float32, the last position of the same forward pass
    n_layers: int
    n_pos: int
    #: (n_targets, n_adapter_nodes) float32, in the order of the AdapterWrites' nodes
    adapter_direct: torch.Tensor | None = None
    adapter_total: torch.Tensor | None = None
    #: (k,) int64 indices into ``features``, and (k, n_adapter_nodes) float32: each adapter
    #: node's direct effect on those features' pre-activations
    adapter_edge_features: torch.Tensor | None = None
    adapter_edges: torch.Tensor | None = None
    #: (m,) int64 indices into the adapter nodes, and (m, n_sources + n_adapter_nodes)
    #: float32: the direct effects of every feature, error, token and adapter node on those
    #: adapter nodes' activations
    adapter_read_nodes: torch.Tensor | None = None
    adapter_reads: torch.Tensor | None = None
    #: (n_targets, n_layers) float32: the direct effect of each layer's MLP write at BOS
    #: beyond its skip connection, which no node carries (circuit-tracer zeroes them there)
    bos_mlp: torch.Tensor | None = None


def _activation_names(transcoders: Any) -> list[str]:
    module = getattr(transcoders, "_module", transcoders)  # an nnsight Envoy wraps the module
    if hasattr(module, "activation_function"):
        functions = [module.activation_function]  # one cross-layer transcoder
    else:
        functions = [tc.activation_function for tc in module.transcoders]
    names = []
    for fn in functions:
        name = getattr(fn, "__name__", None) or type(fn).__name__
        names.append(name.lower().replace("_", ""))
    return names


def check_unit_slope(transcoders: Any) -> None:
    """Refuse transcoders whose activation is not unit-slope where active (one line, names it)."""
    for name in _activation_names(transcoders):
        if name not in UNIT_SLOPE_ACTIVATIONS:
            raise UnsupportedTranscoderError(
                f"transcoder activation {name!r} is not unit-slope where active, so totals mode "
                f"cannot propagate exact total effects through it; use --graph-mode full "
                f"(supported in totals mode: {', '.join(UNIT_SLOPE_ACTIVATIONS)})"
            )

"""What the attribution forward and backward passes record of the adapter's nodes: each
attention update detached in the direct rows, the gradient at its output, and every linear
node module's activations (:func:`taped_adapter`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from em_circuits.attribution.adapter_nodes import (
    MLP_LINEAR,
    AdapterWrites,
    AttentionWrite,
    PatternWrite,
)
from em_circuits.attribution.lora_factors import LoraFactor, adapted_module


@dataclass
class AdapterTape:
    """What the attribution forward and backward passes record of the adapter: the gradient
    at each attention update's detached output (by its index in ``AdapterWrites.attention``;
    refilled by every backward pass) and each linear node module's activations ``s A x`` as
    tensors of the autograd graph, (rows, n_pos, r) by (layer, module), to differentiate."""

    #: the gradient at each detached update's output, by ("attention", index) or
    #: ("pattern", index) into ``AdapterWrites.attention`` / ``.patterns``
    grads: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    activations: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    #: the value projection's input at each layer with pattern nodes, this forward pass
    value_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    #: the batch rows [start, stop) of total effects: there nothing is detached and gradients
    #: pass through the adapter nodes, as through features; in every other row (direct
    #: effects) the attention updates are detached
    passing_rows: tuple[int, int] = (0, 0)

    def clear(self) -> None:
        """Forget every recorded tensor (they hold the forward pass's autograd graph)."""
        self.grads.clear()
        self.activations.clear()
        self.value_inputs.clear()


def _detached_rows(output: torch.Tensor, tape: AdapterTape) -> torch.Tensor:
    """(rows, 1, 1): 1 in the batch rows where updates are detached, 0 in the passing ones."""
    rows = torch.ones(output.shape[0], 1, 1, dtype=output.dtype, device=output.device)
    start, stop = tape.passing_rows
    rows[start:stop] = 0
    return rows


@contextmanager
def taped_adapter(
    hf_model: torch.nn.Module, adapter: AdapterWrites, tape: AdapterTape
) -> Iterator[None]:
    """While open, every forward pass of ``hf_model`` takes each attention update out of its
    module's output in the batch rows outside ``tape.passing_rows`` and adds it back detached
    (the value is unchanged and the gradient through attention follows the base weights:
    the update is a node of its own, reached only through its activation), records the
    gradient at each such module's output in ``tape``, and records every linear node
    module's activations in ``tape``."""
    handles = []

    def detached(output: torch.Tensor, part: torch.Tensor, key: tuple[str, int]):
        """``output`` with ``part`` of it detached in the detached rows, and a zero probe
        whose gradient (the gradient at the output) lands in ``tape.grads[key]``."""
        part = part.to(output.dtype) * _detached_rows(output, tape)
        probe = torch.zeros_like(output, requires_grad=True)
        probe.register_hook(lambda grad: tape.grads.__setitem__(key, grad))
        return output - part + part.detach() + probe

    def detach(index: int, write: AttentionWrite):
        def fn(_module, args, output):
            record(write.factor)(_module, args, output)
            return detached(output, write.update(args[0]), ("attention", index))

        return fn

    def record(f: LoraFactor):
        def fn(_module, args, _output):
            tape.activations[f.layer, f.module] = f.activation(args[0])

        return fn

    def value_input(layer: int):
        def fn(_module, args, _output):
            tape.value_inputs[layer] = args[0]

        return fn

    def detach_pattern(index: int, write: PatternWrite):
        def fn(_module, _args, output):
            value = write.value(tape.value_inputs[write.factor.layer])
            return detached(output, value, ("pattern", index))

        return fn

    try:
        for layer in sorted({w.factor.layer for w in adapter.patterns}):
            module = adapted_module(hf_model, layer, "v_proj")
            handles.append(module.register_forward_hook(value_input(layer)))
        for index, pattern in enumerate(adapter.patterns):
            module = adapted_module(hf_model, pattern.factor.layer, "o_proj")
            handles.append(module.register_forward_hook(detach_pattern(index, pattern)))
        for index, write in enumerate(adapter.attention):
            module = adapted_module(hf_model, write.factor.layer, write.factor.module)
            handles.append(module.register_forward_hook(detach(index, write)))
        for f in adapter.factors:
            if f.module in MLP_LINEAR:
                module = adapted_module(hf_model, f.layer, f.module)
                handles.append(module.register_forward_hook(record(f)))
        yield
    finally:
        for handle in handles:
            handle.remove()

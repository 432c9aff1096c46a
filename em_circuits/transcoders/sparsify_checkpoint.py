"""sparsify's checkpoints: each saved whole or not at all, put right after a kill, and written
out as circuit-tracer's per-layer set (``config.yaml`` + ``layer_N.safetensors``)."""

from __future__ import annotations

import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from em_circuits.core.atomic import atomic_path, atomic_write_text
from em_circuits.models.transcoder_formats import (
    MLP_INPUT_HOOK,
    MLP_OUTPUT_HOOK,
    RELU_TOPK,
    SPARSIFY_TENSOR_NAMES,
)
from em_circuits.models.transcoder_source import TranscoderSource

CHECKPOINT_DIR = "checkpoint"
RUN_NAME = "sparsify"
CONFIG_FILE = "config.yaml"


def checkpoint_trainer_class() -> type:
    """sparsify's Trainer, saving each checkpoint to a temporary folder that is then swapped
    for the previous one, so a kill mid-save leaves the last complete checkpoint."""
    import torch.distributed as dist  # noqa: PLC0415  # heavy: torch
    from sparsify import Trainer

    class CheckpointingTrainer(Trainer):
        save_seconds = 0.0  # spent writing checkpoints (not training)

        def save(self) -> None:
            started = time.perf_counter()
            path = Path(self.cfg.save_dir) / (self.cfg.run_name or RUN_NAME)
            if not dist.is_initialized() or dist.get_rank() == 0:
                partial = path.with_name(path.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                self._checkpoint(self.saes, str(partial), True)
                previous = path.with_name(path.name + ".previous")
                if path.exists():
                    path.rename(previous)
                partial.rename(path)
                shutil.rmtree(previous, ignore_errors=True)
            if dist.is_initialized():
                dist.barrier()
            self.save_seconds += time.perf_counter() - started

    return CheckpointingTrainer


def recover_checkpoint(path: Path) -> None:
    """Undo a swap a kill interrupted: the previous checkpoint comes back if no new one
    replaced it; a half-written one is dropped."""
    previous = path.with_name(path.name + ".previous")
    if not path.exists() and previous.exists():
        previous.rename(path)
    shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(path.with_name(path.name + ".partial"), ignore_errors=True)


def sparsify_version() -> str | None:
    try:
        return version("eai-sparsify")
    except PackageNotFoundError:
        return None


def write_circuit_tracer_set(
    source: TranscoderSource, out: Path, *, base_model: str | None = None
) -> Path:
    """A resolved sparsify set (:func:`read_sparsify_set`, one k for all layers) as
    circuit-tracer's per-layer files and ``config.yaml``; each file is written whole or not
    at all, the config last. Returns the config's path."""
    from safetensors.torch import load_file, save_file

    ks = set(source.config["k"])
    if len(ks) != 1:
        raise ValueError(f"{source.ref}: layers differ in k ({sorted(ks)}); need one k")
    files = []
    for layer, path in enumerate(source.files):
        stored = load_file(str(path))
        state = {
            ours: stored[theirs].float().contiguous()
            for ours, theirs in SPARSIFY_TENSOR_NAMES.items()
            if theirs in stored
        }
        name = f"layer_{layer}.safetensors"
        with atomic_path(out / name) as tmp:
            save_file(state, str(tmp))
        files.append(name)
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": MLP_INPUT_HOOK,
        "feature_output_hook": MLP_OUTPUT_HOOK,
        "activation": RELU_TOPK,
        "k": ks.pop(),
        "scan": source.config["scan"],
        "transcoders": files,
    }
    if base_model is not None:
        config["model_name"] = base_model
    path = out / CONFIG_FILE
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path

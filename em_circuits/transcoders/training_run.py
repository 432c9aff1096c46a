"""What a transcoder training run is: its parameters, its identity (the settings that decide
what is trained) and the check that an output folder holds no run with other settings."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from em_circuits.models.spec import ModelLoadError

#: The run's record in its output folder: its identity, and once complete what it trained.
TRAINING_FILE = "training.json"


class TrainingError(ModelLoadError):
    """A training request that cannot run as given (bad data, a folder of another run)."""


@dataclass(frozen=True)
class TrainingParams:
    """How to train; the fields that change what is trained make a run's identity."""

    k: int = 32
    expansion_factor: int = 32
    num_latents: int = 0  # 0: expansion_factor x the model width
    ctx_len: int = 2048
    batch_size: int = 8  # rows (sequences) per step, per process
    grad_acc_steps: int = 1
    micro_acc_steps: int = 1
    # Adam at 1e-3 after a short warm-up: sparsify's own default (sign-SGD at a learning rate
    # set by the width) diverged on a Qwen2.5-0.5B-shaped model and fit the toy organism
    # poorly, where this improved steadily (benchmarks/RESULTS.md). None: sparsify's default.
    lr: float | None = 1e-3
    optimizer: str = "adam"
    lr_warmup_steps: int = 100  # adam only
    auxk_alpha: float = 0.0
    dead_feature_threshold: int = 10_000_000
    epochs: int = 1
    seed: int = 0
    # Not part of the identity: a run can be given more tokens, or saved more often.
    max_tokens: int | None = None
    save_every: int = 1000

    def identity(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("max_tokens", "save_every"):
            out.pop(key)
        return out


def run_identity(model_ref: str, model: Any, dataset: str, params: TrainingParams) -> dict:
    return {
        "base_model": model_ref,
        "model_config": {
            "model_type": model.config.model_type,
            "num_hidden_layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
        },
        "dataset": dataset,
        "params": params.identity(),
    }


def check_same_run(out: Path, identity: dict[str, Any]) -> None:
    record_path = out / TRAINING_FILE
    if not record_path.is_file():
        return
    try:
        stored = json.loads(record_path.read_text()).get("identity")
    except (OSError, ValueError):
        stored = None
    if stored is not None and stored != identity:
        changed = sorted(
            key
            for key in set(stored.get("params", {})) | set(identity["params"])
            if stored.get("params", {}).get(key) != identity["params"].get(key)
        )
        changed += [
            key
            for key in ("base_model", "dataset", "model_config")
            if stored.get(key) != identity[key]
        ]
        raise TrainingError(
            f"{record_path}: this folder holds a training run with other settings "
            f"({', '.join(changed)}); give another --out, or --restart to discard it"
        )

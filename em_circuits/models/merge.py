"""Merging a LoRA adapter into its base in fp32, with integrity and base-match checks."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from em_circuits.core.atomic import (
    apply_default_modes,
    atomic_write_text,
    crash_point,
    make_temp_dir,
)
from em_circuits.models.adapter_check import check_adapter_fits
from em_circuits.models.spec import ModelLoadError, ModelSpec, resolve_model_dir

log = logging.getLogger(__name__)


@dataclass
class MergeReport:
    """What the merge changed, checked against what the adapter declares it targets."""

    declared_base: str | None
    given_base: str
    target_modules: list[str]
    changed: dict[str, float] = field(default_factory=dict)  # param name -> ||delta||_F
    unchanged_targets: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def changed_layers(self) -> list[int]:
        layers = set()
        for name in self.changed:
            parts = name.split(".")
            for i, part in enumerate(parts[:-1]):
                if part == "layers" and parts[i + 1].isdigit():
                    layers.add(int(parts[i + 1]))
        return sorted(layers)

    def summary(self) -> str:
        modules = sorted({".".join(n.split(".")[-2:-1]) for n in self.changed})
        total = sum(v * v for v in self.changed.values()) ** 0.5
        return (
            f"adapter changed {len(self.changed)} weight matrices in layers {self.changed_layers}"
            f" (modules {modules}, total delta norm {total:.4g})"
        )


def _expected_lora_params(config: dict[str, Any], names: list[str]) -> set[str]:
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regex in PEFT
        pattern = re.compile(targets)
        matched = {n for n in names if pattern.fullmatch(n.rsplit(".", 1)[0])}
    else:
        matched = {n for n in names if n.rsplit(".", 1)[0].split(".")[-1] in set(targets)}
    layers = config.get("layers_to_transform")
    if layers is not None:
        layers = {layers} if isinstance(layers, int) else set(layers)
        matched = {n for n in matched if _layer_index(n) in layers}
    # modules retrained whole (accepted at start-up on an untied base) change too
    saved = set(config.get("modules_to_save") or [])
    matched |= {n for n in names if n.rsplit(".", 1)[0].split(".")[-1] in saved}
    return {n for n in matched if n.endswith(".weight")}


def _file_names_match(model_dir: Path, names: set[str]) -> bool:
    keys: set[str] = set()
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys.update(handle.keys())
    return bool(keys) and len(keys & names) >= 0.9 * len(keys)


def _file_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's weights read back one tensor at a time, as float32 (as the merge loaded
    them), so checking the merge needs one model in memory, not two."""
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key).to(torch.float32)


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def merge_adapter(spec: ModelSpec, out_dir: Path, dtype: torch.dtype) -> MergeReport:
    """Merge the LoRA into the base in fp32, cast, save to ``out_dir`` atomically, and check it.

    The check compares every parameter of the merged model with the base: exactly the modules
    the adapter targets may differ. Anything else means the wrong base or a broken adapter.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.adapter is None:
        raise ModelLoadError(f"{spec.display_name}: no adapter to merge (spec.adapter is None)")
    base_dir = resolve_model_dir(spec.base, spec.base_revision, "base model")
    adapter_dir = resolve_model_dir(spec.adapter, spec.adapter_revision, "adapter")
    notes = check_adapter_fits(spec)  # again: the merge may run in a later process
    config = json.loads((adapter_dir / "adapter_config.json").read_text())

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # Without safetensors files whose names are the model's to read the base back from, keep
    # a copy (twice the memory).
    base_copy = None
    if not _file_names_match(base_dir, set(base.state_dict())):
        base_copy = {k: v.detach().clone() for k, v in base.state_dict().items()}
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    merged = peft_model.merge_and_unload()
    merged_state = merged.state_dict()

    report = MergeReport(
        declared_base=config.get("base_model_name_or_path"),
        given_base=spec.base,
        target_modules=sorted(config.get("target_modules") or []),
        warnings=list(notes),
    )
    expected = _expected_lora_params(config, list(merged_state))
    before_tensors = base_copy.items() if base_copy is not None else _file_tensors(base_dir)
    for name, before in before_tensors:
        after = merged_state.get(name)
        if after is None:
            continue
        delta = (after.float() - before.float()).norm().item()
        if delta > 0:
            report.changed[name] = delta
    unexpected = sorted(set(report.changed) - expected)
    if unexpected:
        raise ModelLoadError(
            f"merging {spec.adapter!r} changed weights the adapter does not target: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    report.unchanged_targets = sorted(expected - set(report.changed))
    if not report.changed:
        raise ModelLoadError(f"adapter {spec.adapter!r} changes no weights (all LoRA B are zero?)")
    if report.unchanged_targets:
        report.warnings.append(
            f"{len(report.unchanged_targets)} targeted matrices are unchanged, "
            f"e.g. {report.unchanged_targets[0]}"
        )

    out_dir = Path(out_dir)
    # Named with host and PID, so that a run after a kill -9 here removes this full model copy.
    tmp = make_temp_dir(out_dir)
    try:
        merged.to(dtype).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        atomic_write_text(tmp / "merge_report.json", json.dumps(asdict(report), indent=1))
        apply_default_modes(tmp)  # safetensors writes 0600 files whatever the umask
        crash_point(out_dir, "merge")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def load_merge_report(merged_dir: Path) -> MergeReport:
    data = json.loads((Path(merged_dir) / "merge_report.json").read_text())
    return MergeReport(**data)

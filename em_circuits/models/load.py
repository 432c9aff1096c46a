"""Loading a model: transcoder sets, the merged weights, circuit-tracer's replacement model."""

from __future__ import annotations

import gc
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from em_circuits.core.atomic import remove_orphaned_temporaries
from em_circuits.models.merge import MergeReport, load_merge_report, merge_adapter
from em_circuits.models.spec import (
    ModelLoadError,
    ModelSpec,
    default_device,
    fingerprint,
    local_transcoder_files,
    model_slug,
    resolve_dtype,
    resolve_model_dir,
    transcoder_config_path,
)

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A forward pass produced NaN or Inf."""


def load_transcoder_set(ref: str, device: torch.device, dtype: torch.dtype):
    """A circuit-tracer TranscoderSet from a preset, an HF reference or a local config.yaml.

    Local configs follow circuit-tracer's format; file paths in them may be relative to the
    config's directory, so a transcoder folder can be moved or shared as a whole.
    """
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub, load_transcoders

    config_path = transcoder_config_path(ref)
    if config_path is None:
        try:
            transcoders, _ = load_transcoder_from_hub(ref, device=device, dtype=dtype)
        except Exception as err:
            raise ModelLoadError(
                f"cannot load transcoder set {ref!r} ({type(err).__name__}: {err}). Give a "
                f"local config.yaml, or run once with internet access to cache it."
            ) from err
        return transcoders
    import yaml

    config = yaml.safe_load(config_path.read_text())
    for key in ("model_kind", "feature_input_hook", "feature_output_hook"):
        if key not in config:
            raise ModelLoadError(f"{config_path}: missing '{key}'")
    config["transcoders"] = [str(p) for p in local_transcoder_files(config_path)]
    config.setdefault("scan", config_path.parent.name)
    small = sum(p.stat().st_size for p in map(Path, config["transcoders"])) < (1 << 30)
    transcoders = load_transcoders(
        config, device=device, dtype=dtype, lazy_encoder=False, lazy_decoder=not small
    )
    # circuit-tracer's loader knows ReLU and JumpReLU; TopK transcoders declare themselves here.
    if str(config.get("activation", "")).lower() == "topk":
        from circuit_tracer.transcoder.activation_functions import TopK

        if not isinstance(config.get("k"), int) or config["k"] < 1:
            raise ModelLoadError(f"{config_path}: 'activation: topk' needs a positive integer 'k'")
        for transcoder in transcoders:
            transcoder.activation_function = TopK(config["k"])
    return transcoders


@dataclass
class LoadedModel:
    """A replacement model plus the identity that every artifact it produces must carry."""

    spec: ModelSpec
    fingerprint: str
    slug: str
    replacement: Any  # circuit_tracer NNSightReplacementModel
    device: torch.device
    dtype: torch.dtype
    merge_report: MergeReport | None = None

    @property
    def tokenizer(self):
        return self.replacement.tokenizer

    @property
    def hf_model(self) -> torch.nn.Module:
        return self.replacement._model

    def encode(self, text: str) -> torch.Tensor:
        """Token ids exactly as attribution sees them (BOS prepended once)."""
        return self.replacement.ensure_tokenized(text)

    def identity(self) -> dict[str, Any]:
        return {
            "model_fingerprint": self.fingerprint,
            "model_slug": self.slug,
            "model_spec": asdict(self.spec),
        }


def _merged_once(spec: ModelSpec, weights_dir: Path, dtype: torch.dtype) -> MergeReport:
    """The cached merge, made by whichever process gets the lock first (others wait)."""
    import fcntl

    if (weights_dir / "merge_report.json").is_file():
        return load_merge_report(weights_dir)  # renamed into place complete: no lock needed
    weights_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(weights_dir.parent / f".{weights_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # A merge killed mid-write left a full model copy; the cache may lie outside any
        # results root that the commands clean up.
        remove_orphaned_temporaries(weights_dir.parent, recursive=False)
        if (weights_dir / "merge_report.json").is_file():
            return load_merge_report(weights_dir)
        log.info(
            "merging adapter %s onto %s (once; cached in %s)", spec.adapter, spec.base, weights_dir
        )
        return merge_adapter(spec, weights_dir, dtype)


def merged_model_dir(spec: ModelSpec, cache_root: Path, device: torch.device | str) -> Path:
    fp = fingerprint(spec, device)
    return Path(cache_root) / model_slug(spec, fp)


def load_model(
    spec: ModelSpec,
    device: torch.device | str | None = None,
    merged_cache: Path | str = "results/cache/merged",
    check_inputs: list[str] | None = None,
    transcoder_set: Any = None,
) -> LoadedModel:
    """Load a spec as a circuit-tracer replacement model, merging and checking its adapter.

    The merged adapter is built once per fingerprint and cached on disk. A forward pass on
    ``check_inputs`` (or a short probe) must be finite, else NonFiniteError names the layer.
    Pass ``transcoder_set`` (from :func:`load_transcoder_set`) to share one set between the base
    and the adapted model, which hold the same transcoders, when both stay in memory.
    """
    from circuit_tracer import ReplacementModel

    device = torch.device(device or default_device())
    dtype = resolve_dtype(spec.dtype, device)
    fp = fingerprint(spec, device)
    slug = model_slug(spec, fp)
    report = None
    if spec.adapter is None:
        weights_dir = resolve_model_dir(spec.base, spec.base_revision, "base model")
    else:
        weights_dir = Path(merged_cache) / slug
        report = _merged_once(spec, weights_dir, dtype)
        log.info("%s: %s", spec.display_name, report.summary())
        for warning in report.warnings:
            log.warning("%s: %s", spec.display_name, warning)

    transcoders = transcoder_set
    if transcoders is None:
        transcoders = load_transcoder_set(spec.transcoders, device, dtype)
    try:
        replacement = ReplacementModel.from_pretrained_and_transcoders(
            str(weights_dir), transcoders, backend="nnsight", device=device, dtype=dtype
        )
    except KeyError as err:
        raise ModelLoadError(
            f"circuit-tracer's nnsight backend cannot map hook {err} for {spec.base!r}; "
            f"use a transcoder config whose hooks exist for this architecture"
        ) from err
    loaded = LoadedModel(spec, fp, slug, replacement, device, dtype, report)
    check_finite(loaded, check_inputs or ["The quick brown fox jumps over the lazy dog."])
    return loaded


def decoder_layers(hf_model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (``hf_model.model.layers``)."""
    layers = getattr(getattr(hf_model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelLoadError(
            f"{type(hf_model).__name__} has no decoder layers at .model.layers (a ModuleList)"
        )
    return layers


def check_finite(model: LoadedModel, texts: list[str]) -> None:
    """Run a forward pass and name the first decoder layer whose output is NaN/Inf."""
    layers = decoder_layers(model.hf_model)
    bad: list[int] = []

    def hook(index: int):
        def fn(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if not bad and not torch.isfinite(hidden).all():
                bad.append(index)

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for text in texts:
                ids = model.encode(text)[None]
                logits = model.hf_model(ids).logits
                if bad or not torch.isfinite(logits).all():
                    where = f"layer {bad[0]}" if bad else "the final logits"
                    raise NonFiniteError(
                        f"{model.spec.display_name} ({model.slug}) produced NaN/Inf at {where} on "
                        f"{text[:60]!r}; try --dtype float32 or bfloat16 (float16 overflows)"
                    )
    finally:
        for handle in handles:
            handle.remove()


def release(model: LoadedModel | None) -> None:
    """Free a model's memory before loading the next one."""
    if model is None:
        return
    model.replacement = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

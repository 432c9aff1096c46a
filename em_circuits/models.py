"""Model specs, fingerprints, adapter merging with integrity checks, and replacement models.

A :class:`ModelSpec` names everything that decides a model's outputs: the base weights, an
optional LoRA adapter, the dtype and the transcoder set. Its fingerprint hashes all of them
(the adapter weights included), and every artifact carries the fingerprint of the model that
produced it, so results of two different models never mix.

The same code path serves the embedded toy organism (local directories) and real models
(Hugging Face ids such as ``meta-llama/Llama-3.2-1B-Instruct`` with the ``llama`` transcoders).
Every model is a circuit-tracer ``ReplacementModel`` on the nnsight backend; the object that
gives next-token logits for labeling is the one that computes attribution graphs, so stored
labels always refer to the graph's logits.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from em_circuits.store import atomic_write_text, slugify

log = logging.getLogger(__name__)

TRANSCODER_PRESETS = {"llama", "gemma"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model, adapter or transcoder set cannot be loaded as specified."""


class NonFiniteError(RuntimeError):
    """A forward pass produced NaN or Inf."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model is. ``dtype='auto'`` means bf16 on CUDA and fp32 on CPU."""

    base: str
    transcoders: str
    adapter: str | None = None
    base_revision: str | None = None
    adapter_revision: str | None = None
    dtype: str = "auto"
    name: str | None = None
    allow_base_mismatch: bool = False

    def base_only(self) -> ModelSpec:
        """The same base, dtype and transcoders without the adapter."""
        name = f"{self.name}-base" if self.name and self.adapter else self.name
        return ModelSpec(
            base=self.base,
            transcoders=self.transcoders,
            base_revision=self.base_revision,
            dtype=self.dtype,
            name=name,
        )

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        ref = self.adapter or self.base
        return Path(ref.rstrip("/")).name if os.path.isdir(ref) else ref


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (fp16 overflowed into NaNs in the prior art), fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


def default_device() -> torch.device:
    """The GPU of this process (its local rank under a launcher), else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


# -- locating weights -------------------------------------------------------------------------
def resolve_model_dir(ref: str, revision: str | None = None, what: str = "model") -> Path:
    """A local directory as is, or a Hugging Face id downloaded (or found in the HF cache)."""
    if os.path.isdir(ref):
        return Path(ref).resolve()
    if os.path.exists(ref):
        raise ModelLoadError(f"{what} {ref!r} is a file; expected a directory or a Hugging Face id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, revision=revision))
    except Exception as err:  # offline, gated, or a typo: say which and how to fix it
        raise ModelLoadError(
            f"cannot find {what} {ref!r}: it is not a local directory and downloading it from "
            f"the Hugging Face Hub failed ({type(err).__name__}: {err}). Give a local directory, "
            f"or run once with internet access (and HF_TOKEN for gated models)."
        ) from err


def _sha256_file(path: Path, sample: bool = False) -> str:
    """Hash a file; for very large weight files, hash size + evenly spaced 1 MiB chunks."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    chunk = 1 << 20
    with open(path, "rb") as handle:
        if not sample or size <= 512 * chunk:
            for block in iter(lambda: handle.read(chunk), b""):
                digest.update(block)
        else:
            digest.update(str(size).encode())
            for i in range(33):
                handle.seek(min(size - chunk, i * (size // 32)))
                digest.update(handle.read(chunk))
    return digest.hexdigest()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".yaml")


# Where a file was made, not what it computes: left out so that the same weights in another
# folder or on another machine keep their fingerprint (the base is fingerprinted on its own).
_PATH_FIELDS = {"adapter_config.json": ("base_model_name_or_path",),
                "config.json": ("_name_or_path",)}


def _file_identity(file: Path, sample: bool) -> str:
    if file.name in _PATH_FIELDS:
        config = json.loads(file.read_text())
        for key in _PATH_FIELDS[file.name]:
            config.pop(key, None)
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return _sha256_file(file, sample=sample)


def _dir_identity(path: Path, sample: bool) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.suffix not in _WEIGHT_SUFFIXES or file.name.startswith("."):
            continue
        digest.update(str(file.relative_to(path)).encode())
        digest.update(_file_identity(file, sample).encode())
    return digest.hexdigest()


def _ref_identity(ref: str, revision: str | None, sample: bool) -> dict[str, Any]:
    if os.path.isdir(ref):
        return {"local": True, "content_sha256": _dir_identity(Path(ref), sample=sample)}
    return {"local": False, "id": ref, "revision": revision or "main"}


def transcoder_config_path(ref: str) -> Path | None:
    """The local transcoder config a reference names, or None for presets and HF refs."""
    path = Path(ref)
    if path.is_dir():
        path = path / "config.yaml"
    if path.is_file():
        return path.resolve()
    if os.path.sep in ref and ref not in TRANSCODER_PRESETS and (ref.startswith((".", "/"))):
        raise ModelLoadError(f"transcoder config {ref!r} does not exist")
    return None


def _transcoder_identity(ref: str) -> dict[str, Any]:
    config = transcoder_config_path(ref)
    if config is None:
        return {"local": False, "ref": ref}
    digest = hashlib.sha256(config.read_bytes())
    for layer_file in _local_transcoder_files(config):
        digest.update(_sha256_file(layer_file, sample=True).encode())
    return {"local": True, "content_sha256": digest.hexdigest()}


def fingerprint(spec: ModelSpec, device: torch.device | str | None = None) -> str:
    """Hash of base, adapter weights, resolved dtype and transcoders (not the device)."""
    dtype = resolve_dtype(spec.dtype, device or default_device())
    identity = {
        "base": _ref_identity(spec.base, spec.base_revision, sample=True),
        "adapter": None
        if spec.adapter is None
        else _ref_identity(spec.adapter, spec.adapter_revision, sample=False),
        "dtype": str(dtype).removeprefix("torch."),
        "transcoders": _transcoder_identity(spec.transcoders),
    }
    blob = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def model_slug(spec: ModelSpec, fp: str) -> str:
    """Directory name for a model's artifacts: readable name plus fingerprint prefix."""
    return f"{slugify(spec.display_name)}--{fp[:12]}"


# -- adapter merge and integrity ---------------------------------------------------------------
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


def _same_base(declared: str, given: str) -> bool:
    if declared == given:
        return True
    if os.path.exists(declared) and os.path.exists(given):
        return Path(declared).resolve() == Path(given).resolve()
    # An HF id and a local copy of it, or a mirror org (unsloth/X vs meta-llama/X): same name.
    return Path(declared.rstrip("/")).name.lower() == Path(given.rstrip("/")).name.lower()


def check_adapter_base(spec: ModelSpec, adapter_dir: Path) -> dict[str, Any]:
    """Read adapter_config.json and refuse an adapter declared for another base."""
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{adapter_dir} has no adapter_config.json: is it a PEFT adapter?")
    config = json.loads(config_path.read_text())
    declared = config.get("base_model_name_or_path")
    if declared and declared != spec.base and _same_base(declared, spec.base):
        log.warning("adapter %s declares base %r; using %r, taken as the same model (same name)",
                    spec.adapter, declared, spec.base)
    if declared and not _same_base(declared, spec.base) and not spec.allow_base_mismatch:
        raise ModelLoadError(
            f"adapter {spec.adapter!r} declares base model {declared!r} "
            f"({config_path}), but the given base is {spec.base!r}. Merging a LoRA onto another "
            f"base silently gives a different model. Pass the right --base-model, or "
            f"--allow-adapter-base-mismatch if you know the weights are identical."
        )
    return config


def _expected_lora_params(config: dict[str, Any], names: list[str]) -> set[str]:
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regex in PEFT
        import re

        pattern = re.compile(targets)
        matched = {n for n in names if pattern.fullmatch(n.rsplit(".", 1)[0])}
    else:
        matched = {n for n in names if n.rsplit(".", 1)[0].split(".")[-1] in set(targets)}
    layers = config.get("layers_to_transform")
    if layers is not None:
        layers = {layers} if isinstance(layers, int) else set(layers)
        matched = {n for n in matched if _layer_index(n) in layers}
    return {n for n in matched if n.endswith(".weight")}


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

    assert spec.adapter is not None
    base_dir = resolve_model_dir(spec.base, spec.base_revision, "base model")
    adapter_dir = resolve_model_dir(spec.adapter, spec.adapter_revision, "adapter")
    config = check_adapter_base(spec, adapter_dir)

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    merged = peft_model.merge_and_unload()
    merged_state = merged.state_dict()

    report = MergeReport(
        declared_base=config.get("base_model_name_or_path"),
        given_base=spec.base,
        target_modules=sorted(config.get("target_modules") or []),
    )
    expected = _expected_lora_params(config, list(base_state))
    for name, before in base_state.items():
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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        merged.to(dtype).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        atomic_write_text(tmp / "merge_report.json", json.dumps(asdict(report), indent=1))
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


# -- transcoders -------------------------------------------------------------------------------
def _local_transcoder_files(config_path: Path) -> list[Path]:
    import yaml

    config = yaml.safe_load(config_path.read_text())
    files = config.get("transcoders")
    if not files:
        raise ModelLoadError(f"{config_path}: no 'transcoders' list of per-layer files")
    paths = [(config_path.parent / f).resolve() for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ModelLoadError(f"{config_path}: transcoder files not found: {missing}")
    return paths


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
    config["transcoders"] = [str(p) for p in _local_transcoder_files(config_path)]
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


# -- the loaded model ---------------------------------------------------------------------------
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

    weights_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(weights_dir.parent / f".{weights_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (weights_dir / "merge_report.json").is_file():
            return load_merge_report(weights_dir)
        log.info("merging adapter %s onto %s (once; cached in %s)", spec.adapter, spec.base,
                 weights_dir)
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


def check_finite(model: LoadedModel, texts: list[str]) -> None:
    """Run a forward pass and name the first decoder layer whose output is NaN/Inf."""
    layers = model.hf_model.model.layers
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

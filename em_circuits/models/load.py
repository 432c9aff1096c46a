"""Loading a model: transcoder sets, the merged weights, circuit-tracer's replacement model."""

from __future__ import annotations

import fcntl
import functools
import gc
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from em_circuits.core.atomic import remove_orphaned_temporaries
from em_circuits.core.prompt_records import has_chat_template, model_input
from em_circuits.models.architectures import load_replacement
from em_circuits.models.merge import MergeReport, load_merge_report, merge_adapter
from em_circuits.models.spec import (
    ModelLoadError,
    ModelSpec,
    chat_template_sha,
    fingerprint,
    model_slug,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
)
from em_circuits.models.transcoder_source import (
    NoLayerFilesError,
    resolve_transcoders,
    transcoder_config_path,
    transcoder_identity,
)

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A forward pass produced NaN or Inf."""


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the model has positions."""


def load_transcoder_set(ref: str, device: torch.device, dtype: torch.dtype):
    """A circuit-tracer transcoder set from a local config.yaml or sparsify folder, a preset
    or a hub ref (:mod:`em_circuits.models.transcoder_formats` lists the formats).

    Hub files come from the local Hugging Face cache when they are there, so a cached preset
    loads offline; file paths in a config are relative to its folder (a snapshot's, for a
    config inside one), so a transcoder folder can be moved or shared as a whole.
    """
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    from em_circuits.models.transcoders import build_transcoder_set  # noqa: PLC0415  # heavy: loads circuit-tracer

    try:
        source = resolve_transcoders(ref)
    except NoLayerFilesError:
        if transcoder_config_path(ref) is not None:
            raise
        # A hub repository without a per-layer file list (a cross-layer transcoder, say):
        # circuit-tracer's own hub loader knows its layout.
        return load_transcoder_from_hub(ref, device=device, dtype=dtype)[0]
    return build_transcoder_set(source, device, dtype)


#: Transcoder sets loaded by this process, by (reference, content, device, dtype): the base
#: and the adapted model of every stage (logits, graphs, causal check) share one, read from
#: disk and moved to the device once per run. A changed file changes the content key.
_TRANSCODER_SETS: dict[tuple[str, str, str, str], Any] = {}


def shared_transcoder_set(ref: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The process's loaded transcoder set for ``ref`` on ``device`` in ``dtype``."""
    identity = json.dumps(transcoder_identity(ref), sort_keys=True)
    key = (ref, identity, str(device), str(dtype))
    if key not in _TRANSCODER_SETS:
        log.info("reading transcoders %s onto %s", ref, device)
        _TRANSCODER_SETS[key] = load_transcoder_set(ref, device, dtype)
    return _TRANSCODER_SETS[key]


def release_transcoders() -> None:
    """Free every shared transcoder set (the end of a run; models using them keep theirs)."""
    _TRANSCODER_SETS.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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

    @property
    def uses_chat_template(self) -> bool:
        return self.spec.chat_template and has_chat_template(self.tokenizer)

    @functools.cached_property
    def input_format(self) -> str:
        """How chat prompts reach this model: ``chat-template:<sha16>`` or ``plain``."""
        template = chat_template_sha(self.spec) if self.uses_chat_template else None
        return f"chat-template:{template}" if template else "plain"

    @property
    def context_length(self) -> int | None:
        return getattr(self.hf_model.config, "max_position_embeddings", None)

    def render(self, record: dict[str, Any]) -> str:
        """The text this model reads for a stored prompt (its chat template applied)."""
        return model_input(record, self.tokenizer, self.spec.chat_template)

    def encode_prompt(self, record: dict[str, Any]) -> torch.Tensor:
        """Token ids of a stored prompt as every stage feeds it; PromptTooLongError when it
        does not fit the model's context."""
        ids = self.encode(self.render(record))
        limit = self.context_length
        if limit is not None and len(ids) > limit:
            raise PromptTooLongError(
                f"prompt {record.get('prompt_id', '?')} is {len(ids)} tokens for "
                f"{self.spec.display_name}, whose context is {limit} positions; shorten it or "
                "leave it out"
            )
        return ids

    def identity(self) -> dict[str, Any]:
        return {
            "model_fingerprint": self.fingerprint,
            "model_slug": self.slug,
            "model_spec": asdict(self.spec),
        }


def _merged_once(spec: ModelSpec, weights_dir: Path, dtype: torch.dtype) -> MergeReport:
    """The cached merge, made by whichever process gets the lock first (others wait)."""
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
    from transformers import AutoConfig

    from em_circuits.models.transcoders import check_fit  # noqa: PLC0415  # heavy: loads circuit-tracer

    device = resolve_device(device)
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
        transcoders = shared_transcoder_set(spec.transcoders, device, dtype)
    # A set made for another model would fail deep inside circuit-tracer, or not at all.
    check_fit(spec.transcoders, transcoders, AutoConfig.from_pretrained(weights_dir), spec.base)
    replacement = load_replacement(weights_dir, transcoders, device, dtype)
    loaded = LoadedModel(spec, fp, slug, replacement, device, dtype, report)
    check_finite(loaded, check_inputs or ["The quick brown fox jumps over the lazy dog."])
    log.info("loaded %s (%s) on %s in %s", spec.display_name, slug, device, dtype)
    return loaded


class ResidentModels:
    """The models of one run or stage, each loaded once on first use and kept until
    :meth:`release`: the logits, the graphs and the causal check of a pipeline run use the
    same loaded models, on the process's one shared transcoder set
    (:func:`shared_transcoder_set`). ``specs`` names them by role (``base``, ``adapted``);
    :meth:`load` also takes any spec. ``loads`` counts the models actually loaded.
    """

    def __init__(
        self,
        specs: dict[str, ModelSpec] | None,
        device: torch.device | str,
        merged_cache: Path | str,
    ):
        self.specs = dict(specs or {})
        self.device = torch.device(device)
        self.merged_cache = Path(merged_cache)
        self.models: dict[ModelSpec, LoadedModel] = {}
        self.loads = 0

    def load(self, spec: ModelSpec) -> LoadedModel:
        if spec not in self.models:
            self.models[spec] = load_model(spec, self.device, self.merged_cache)
            self.loads += 1
        return self.models[spec]

    def get(self, role: str) -> LoadedModel:
        return self.load(self.specs[role])

    def release(self) -> None:
        for model in self.models.values():
            release(model)
        self.models.clear()


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


def pad_id_of(tokenizer: Any) -> int:
    """The token id that pads a batch: the tokenizer's pad token, else its end of sequence,
    else 0 (padding is masked out, so only its being a valid id matters)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)


def left_padded(
    sequences: Sequence[torch.Tensor], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token-id sequences padded on the left into one batch, each
    ending at the last position (where generation continues and the next token is read)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        ids[row, width - len(tokens) :] = torch.as_tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens) :] = 1
    return ids, mask


def right_padded(
    sequences: Sequence[torch.Tensor], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token-id sequences padded on the right into one batch: with
    causal attention a real position never sees the padding after it."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids, mask


def n_layers_of(model: LoadedModel) -> int:
    hf: Any = model.hf_model
    return int(hf.config.num_hidden_layers)

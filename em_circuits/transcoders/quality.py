"""How well a transcoder set stands in for a model's MLPs, measured on held-out text.

Attribution graphs describe the replacement model, in which every MLP output is the
transcoder's reconstruction from the live MLP input; what it misses goes to error nodes. A set
trained for another model (the base, when the adapted model is analysed), on other text, or
simply too small explains less, and its graphs say less. Measured here, for any loaded model,
at the sites attribution reads and writes (:func:`~em_circuits.models.hooks.hook_sites`),
on every position but BOS (circuit-tracer zeroes features there) and padding:

* per layer: the fraction of variance of the real MLP output the reconstruction leaves
  unexplained (FVU), the same without any feature (the skip connection and decoder bias
  alone: what the features add), mean L0 (active features per position) and the dead
  fraction (features never active on the text);
* the replacement model's next-token top-1 agreement with the real model: every MLP output
  (BOS excepted) replaced by its reconstruction, no error terms, argmax against the real
  model's own logits.

The toy organism's build reports the same numbers through the same code
(:mod:`em_circuits.organism.quality`). The analysis stage stores one record per model, corpus
and parameters (:func:`cached_quality`) and warns when a set is poor (:func:`assess`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from em_circuits.core.cache import cache_key
from em_circuits.core.store import ResultsStore, write_artifact
from em_circuits.core.toy_corpus import sample_documents
from em_circuits.models.corpus import corpus_hash, read_corpus
from em_circuits.models.hooks import hook_sites, record_input_at, transcoder_set
from em_circuits.models.load import LoadedModel, right_padded
from em_circuits.models.spec import words_near

log = logging.getLogger(__name__)

#: Bumped when a measurement changes meaning: stored records of another version are misses.
QUALITY_VERSION = 1

#: A set is poor for a model when any layer leaves more than this share of the MLP output's
#: variance unexplained...
FVU_MAX = 0.3
#: ...or its replacement model picks the real model's next token less often than this.
AGREEMENT_MIN = 0.5


@dataclass(frozen=True)
class QualityParams:
    n_docs: int = 64
    max_tokens: int = 128  # per document; longer documents are cut
    batch_size: int = 8
    seed: int = 0


# -- held-out text -------------------------------------------------------------------------
def heldout_corpus(
    adapted: Any, corpus: str | None, n_docs: int, index_docs: int, seed: int = 0
) -> tuple[list[str], str] | None:
    """(documents, what they are) to measure on: of ``corpus`` (a file, as the feature cards
    read it), ``n_docs`` sampled with a fixed seed from those after the first ``index_docs``
    (the activation index reads those), or from all when none are left; without a file, the
    toy organism's held-out-split documents when the model is the organism; else None."""
    rng = random.Random(f"transcoder-quality-{seed}")
    if corpus:
        texts = read_corpus(corpus)
        rest = texts[index_docs:]
        pool, what = (rest, "not in the activation index") if rest else (texts, "all of them")
        chosen = sorted(rng.sample(range(len(pool)), min(n_docs, len(pool))))
        return [pool[i] for i in chosen], f"{corpus} ({what})"
    if words_near(adapted) is None:
        return None

    # The held-out split (scenarios and phrasings no training step saw), both polarities.
    half = n_docs // 2
    docs = sample_documents(rng, half, split="heldout", assistant_polarity="safe")
    docs += sample_documents(rng, n_docs - half, split="heldout", assistant_polarity="harmful")
    return [doc.text for doc in docs], "the toy organism's held-out documents"


# -- the measurement -----------------------------------------------------------------------
class _LayerStats:
    """Running sums (float64) of one layer's reconstruction errors, output variance, active
    features and which features were ever active."""

    def __init__(self, d_transcoder: int, device: torch.device) -> None:
        self.n = 0
        self.sse = 0.0
        self.sse_affine: float | None = 0.0
        self.sum_sq = 0.0
        self.sum: torch.Tensor | None = None
        self.active = 0
        self.alive = torch.zeros(d_transcoder, dtype=torch.bool, device=device)

    def add(
        self, y: torch.Tensor, y_hat: torch.Tensor, affine: torch.Tensor | None, features: Any
    ) -> None:
        """``y``, ``y_hat`` and ``affine`` (positions x d_model, the kept positions only);
        ``features``: the feature of every active entry at those positions."""
        y = y.double()
        self.n += len(y)
        self.sse += float(((y - y_hat.double()) ** 2).sum())
        if affine is None or self.sse_affine is None:
            self.sse_affine = None
        else:
            self.sse_affine += float(((y - affine.double()) ** 2).sum())
        self.sum_sq += float((y**2).sum())
        total = y.sum(0)
        self.sum = total if self.sum is None else self.sum + total
        self.active += len(features)
        self.alive[features] = True

    def result(self, layer: int) -> dict[str, Any]:
        # Sum of squared deviations from the mean: sum |y|^2 - |sum y|^2 / n.
        spread = self.sum_sq - float((self.sum**2).sum()) / self.n if self.sum is not None else 0.0
        fvu = self.sse / spread if spread > 0 else None
        skip = self.sse_affine / spread if spread > 0 and self.sse_affine is not None else None
        return {
            "layer": layer,
            "fvu": fvu,
            "skip_only_fvu": skip,
            "mean_l0": self.active / self.n if self.n else None,
            "dead_fraction": float((~self.alive).float().mean()),
            "n_tokens": self.n,
        }


def _reconstruct(
    transcoder: Any, x: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(reconstruction, the part without features or None without a skip connection, each
    active entry's flat position, its feature) of ``x`` (batch x positions x d_model), in
    float32; features only at ``valid`` positions. Decoder rows are read for the active
    features only, so a lazily loaded decoder is never read whole."""
    from em_circuits.models.transcoders import active_entries  # noqa: PLC0415  # heavy: loads circuit-tracer

    rows, positions, features, values = active_entries(transcoder, x, valid)
    batch, n_pos, d_model = x.shape
    affine = transcoder.b_dec.float().expand(batch, n_pos, d_model)
    has_skip = getattr(transcoder, "W_skip", None) is not None
    if has_skip:
        affine = affine + transcoder.compute_skip(x.to(transcoder.dtype)).float()
    flat = rows * n_pos + positions
    if len(features):
        used, column = torch.unique(features, return_inverse=True)
        decoders = transcoder._get_decoder_vectors(used).float().to(x.device)
        acts = torch.zeros(batch * n_pos, len(used), device=x.device)
        acts[flat, column] = values
        recon = affine + (acts @ decoders).view(batch, n_pos, d_model)
    else:
        recon = affine.clone()
    return recon, affine if has_skip else None, flat, features


def _output_hook(side: str, change: Callable[[torch.Tensor], torch.Tensor | None]):
    """A forward (pre-)hook that passes a write site's value (the MLP output) to ``change``
    and puts back what it returns (None: leave it)."""
    if side == "input":

        def pre(_module, args):
            new = change(args[0])
            return None if new is None else (new, *args[1:])

        return pre

    def post(_module, _args, output):
        value = output[0] if isinstance(output, tuple) else output
        new = change(value)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return post


def _batches(
    sequences: Sequence[torch.Tensor], batch_size: int, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, attention mask) per batch, right-padded: with causal attention a real position
    never sees the padding after it."""
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = [torch.as_tensor(s, dtype=torch.long).cpu() for s in sequences[start:][:batch_size]]
        out.append(right_padded(chunk, pad_id))
    return out


@torch.no_grad()
def measure(
    hf_model: torch.nn.Module,
    transcoders: Any,
    sequences: Sequence[torch.Tensor],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    agreement_at: Literal["all", "last"] = "all",
) -> dict[str, Any]:
    """Per-layer FVU, skip-only FVU, mean L0 and dead fraction of ``transcoders`` (a per-layer
    circuit-tracer set) in ``hf_model`` on ``sequences`` (token ids, BOS first), and the
    replacement model's top-1 agreement with the real model at every kept position
    (``agreement_at="all"``) or at each sequence's last one."""
    transcoders = getattr(transcoders, "_module", transcoders)
    n_layers = len(transcoders)
    device = next(hf_model.parameters()).device
    sites = [hook_sites(hf_model, transcoders, layer) for layer in range(n_layers)]
    stats = [_LayerStats(int(transcoders.d_transcoder), device) for _ in range(n_layers)]
    agree = compared = 0
    seen: dict[int, torch.Tensor] = {}
    valid = torch.zeros(0, dtype=torch.bool)
    replace = False

    def on_output(layer: int):
        def change(y: torch.Tensor) -> torch.Tensor | None:
            x = seen.pop(layer)
            recon, affine, flat, features = _reconstruct(transcoders[layer], x, valid)
            if replace:
                return torch.where(valid[..., None], recon.to(y.dtype), y)
            keep = valid.reshape(-1)
            stats[layer].add(
                y.reshape(-1, y.shape[-1])[keep],
                recon.reshape(-1, recon.shape[-1])[keep],
                None if affine is None else affine.reshape(-1, affine.shape[-1])[keep],
                features,
            )
            return None

        return change

    handles = []
    try:
        for layer, (read_site, (writes, side)) in enumerate(sites):
            handles.append(record_input_at(read_site, layer, seen))
            hook = _output_hook(side, on_output(layer))
            if side == "input":
                handles.append(writes.register_forward_pre_hook(hook))
            else:
                handles.append(writes.register_forward_hook(hook))
        for ids, mask in _batches(sequences, batch_size, pad_id):
            ids, mask = ids.to(device), mask.to(device)
            valid = mask.bool()
            valid[:, 0] = False  # BOS
            replace = False
            real = hf_model(ids, attention_mask=mask).logits.argmax(-1)
            replace = True
            replaced = hf_model(ids, attention_mask=mask).logits.argmax(-1)
            if agreement_at == "last":
                at = torch.zeros_like(valid)
                at[torch.arange(len(ids)), mask.sum(1) - 1] = True
                at &= valid
            else:
                at = valid
            agree += int((real == replaced)[at].sum())
            compared += int(at.sum())
    finally:
        for handle in handles:
            handle.remove()
    return {
        "layers": [s.result(layer) for layer, s in enumerate(stats)],
        "top1_agreement": agree / compared if compared else None,
        "agreement_positions": compared,
        "n_sequences": len(sequences),
    }


def measure_model(
    model: LoadedModel, texts: Sequence[str], params: QualityParams = QualityParams()
) -> dict[str, Any]:
    """:func:`measure` for a loaded model on documents, each cut at ``max_tokens`` tokens and
    encoded as attribution encodes them (BOS once)."""
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sequences = [model.encode(text)[: params.max_tokens] for text in texts]
    return measure(
        model.hf_model, transcoder_set(model), sequences, batch_size=params.batch_size, pad_id=pad
    )


# -- stored records and the verdict --------------------------------------------------------
def quality_identity(
    fingerprint: str, texts: Sequence[str], params: QualityParams
) -> dict[str, Any]:
    """What a record depends on (its cache key): the model, the text and the parameters."""
    return {
        "model_fingerprint": fingerprint,
        "corpus_sha256": corpus_hash(texts),
        "params": asdict(params),
        "quality_version": QUALITY_VERSION,
    }


def cached_quality(
    store: ResultsStore,
    fingerprint: str,
    slug: str,
    texts: Sequence[str],
    corpus: str,
    params: QualityParams,
    load: Callable[[], LoadedModel],
) -> dict[str, Any]:
    """The stored record of this model, text and parameters, else measured (``load`` gives
    the model, called only then) and stored under ``transcoder_quality/<slug>/``."""
    identity = quality_identity(fingerprint, texts, params)
    key = cache_key(identity)
    path = store.transcoder_quality_path(slug, key)
    expected = {k: v for k, v in identity.items() if k != "model_fingerprint"}
    cached = store.load_for_model(path, "table", fingerprint, **expected)
    if cached is not None:
        return cached
    model = load()
    measured = measure_model(model, texts, params)
    payload = {
        **identity,
        "model_slug": slug,
        "params_key": key,
        "corpus": corpus,
        "n_documents": len(texts),
        **measured,
    }
    return write_artifact(path, "table", payload)


def assess(record: dict[str, Any]) -> list[str]:
    """What makes a set poor for the model the record measured, in words with the numbers;
    empty when it is fine (see :data:`FVU_MAX`, :data:`AGREEMENT_MIN`)."""
    problems = []
    high = [
        (m["layer"], m["fvu"])
        for m in record.get("layers", [])
        if m.get("fvu") is not None and m["fvu"] > FVU_MAX
    ]
    if high:
        layers = ", ".join(f"{layer} ({fvu:.3f})" for layer, fvu in high)
        problems.append(f"FVU above {FVU_MAX} at layer(s) {layers}")
    agreement = record.get("top1_agreement")
    if agreement is not None and agreement < AGREEMENT_MIN:
        problems.append(
            f"replacement top-1 agreement {agreement:.3f} below {AGREEMENT_MIN} "
            f"({record.get('agreement_positions')} positions)"
        )
    return problems

"""The feature activation index: each feature's top activating contexts and its statistics.

A model with its transcoders reads a corpus once, in batches; at every layer the transcoder
encodes the live MLP input (the same read site attribution uses), and every active
(feature, document, position) is merged into fixed-size arrays: per feature the ``top_k``
largest activations with where they occurred, the number of active positions, the sum of
activations and a histogram over log-spaced bins. Memory is bounded by the per-feature top-k,
whatever the corpus size. The BOS position is left out (circuit-tracer zeroes features there).

:class:`ActivationIndex` holds the arrays and the corpus's token ids (to show contexts);
:func:`build_index` fills one from texts and can resume from a saved partial index.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from em_circuits.models.load import LoadedModel

log = logging.getLogger(__name__)

#: Histogram bin edges of activation values (log-spaced; values below the first edge go
#: into bin 0, above the last into the last bin).
HIST_EDGES = np.logspace(-3, 3, 25)


@dataclass(frozen=True)
class IndexParams:
    top_k: int = 10
    batch_size: int = 16
    max_tokens: int = 128  # per document; longer documents are cut
    left: int = 12  # context tokens shown before the activating token
    right: int = 4  # and after


def corpus_hash(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


@dataclass
class ActivationIndex:
    """Per feature (layer, feature id): top activations with (document, position), count of
    active positions, activation sum and histogram; plus the documents' token ids."""

    values: np.ndarray  # (layers, d_transcoder, k) float32, descending; -inf = empty slot
    doc: np.ndarray  # (layers, d_transcoder, k) int32
    pos: np.ndarray  # (layers, d_transcoder, k) int32
    count: np.ndarray  # (layers, d_transcoder) int64: active positions
    total: np.ndarray  # (layers, d_transcoder) float64: sum of activations
    hist: np.ndarray  # (layers, d_transcoder, len(HIST_EDGES) + 1) int64
    tokens: list[np.ndarray]  # per document, its token ids
    n_positions: int = 0  # positions read (BOS and padding excluded)

    @classmethod
    def empty(cls, n_layers: int, d_transcoder: int, k: int) -> ActivationIndex:
        shape = (n_layers, d_transcoder, k)
        return cls(
            values=np.full(shape, -np.inf, dtype=np.float32),
            doc=np.full(shape, -1, dtype=np.int32),
            pos=np.full(shape, -1, dtype=np.int32),
            count=np.zeros(shape[:2], dtype=np.int64),
            total=np.zeros(shape[:2], dtype=np.float64),
            hist=np.zeros((*shape[:2], len(HIST_EDGES) + 1), dtype=np.int64),
            tokens=[],
        )

    @property
    def n_docs(self) -> int:
        return len(self.tokens)

    def frequency(self, layer: int, feature: int) -> float:
        """Share of the positions read where the feature is active."""
        return float(self.count[layer, feature]) / max(self.n_positions, 1)

    def top(self, layer: int, feature: int) -> list[tuple[float, int, int]]:
        """(activation, document, position) of the feature's top activations, descending."""
        keep = np.isfinite(self.values[layer, feature])
        return [
            (float(v), int(d), int(p))
            for v, d, p in zip(
                self.values[layer, feature][keep],
                self.doc[layer, feature][keep],
                self.pos[layer, feature][keep],
            )
        ]

    def add(
        self, layer: int, feature: np.ndarray, value: np.ndarray, doc: np.ndarray, pos: np.ndarray
    ) -> None:
        """Merge active entries of one layer (arrays of equal length) into the index."""
        if len(feature) == 0:
            return
        np.add.at(self.count[layer], feature, 1)
        np.add.at(self.total[layer], feature, value.astype(np.float64))
        bins = np.searchsorted(HIST_EDGES, value)
        np.add.at(self.hist[layer], (feature, bins), 1)
        k = self.values.shape[2]
        touched = np.unique(feature)
        old_f = np.repeat(touched, k)
        all_f = np.concatenate([old_f, feature])
        all_v = np.concatenate([self.values[layer, touched].ravel(), value.astype(np.float32)])
        all_d = np.concatenate([self.doc[layer, touched].ravel(), doc.astype(np.int32)])
        all_p = np.concatenate([self.pos[layer, touched].ravel(), pos.astype(np.int32)])
        # Within each feature, the largest values first (ties: the earlier document first).
        order = np.lexsort((all_p, all_d, -all_v, all_f))
        all_f, all_v, all_d, all_p = all_f[order], all_v[order], all_d[order], all_p[order]
        starts = np.searchsorted(all_f, touched)
        rank = np.arange(len(all_f)) - np.repeat(starts, np.diff(np.append(starts, len(all_f))))
        keep = rank < k
        rows = np.searchsorted(touched, all_f[keep])
        slots = rank[keep]
        values = np.full((len(touched), k), -np.inf, dtype=np.float32)
        docs = np.full((len(touched), k), -1, dtype=np.int32)
        positions = np.full((len(touched), k), -1, dtype=np.int32)
        values[rows, slots], docs[rows, slots], positions[rows, slots] = (
            all_v[keep],
            all_d[keep],
            all_p[keep],
        )
        self.values[layer, touched] = values
        self.doc[layer, touched] = docs
        self.pos[layer, touched] = positions

    # -- storage ---------------------------------------------------------------------------
    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Write the index atomically (``.npz``) with its metadata (``.json`` beside it)."""
        from em_circuits.core.atomic import atomic_path, atomic_write_text

        lengths = np.array([len(t) for t in self.tokens], dtype=np.int64)
        flat = np.concatenate(self.tokens) if self.tokens else np.zeros(0, dtype=np.int64)
        with atomic_path(path.with_suffix(".npz")) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(
                    handle,
                    values=self.values,
                    doc=self.doc,
                    pos=self.pos,
                    count=self.count,
                    total=self.total,
                    hist=self.hist,
                    token_lengths=lengths,
                    tokens=flat,
                    n_positions=np.array(self.n_positions),
                )
        atomic_write_text(
            path.with_suffix(".json"), json.dumps({**meta, "n_docs": self.n_docs}, indent=1)
        )

    @classmethod
    def load(cls, path: Path) -> tuple[ActivationIndex, dict[str, Any]]:
        with np.load(path.with_suffix(".npz")) as data:
            splits = np.cumsum(data["token_lengths"])[:-1]
            tokens = list(np.split(data["tokens"], splits)) if len(data["token_lengths"]) else []
            index = cls(
                values=data["values"],
                doc=data["doc"],
                pos=data["pos"],
                count=data["count"],
                total=data["total"],
                hist=data["hist"],
                tokens=tokens,
                n_positions=int(data["n_positions"]),
            )
        meta = json.loads(path.with_suffix(".json").read_text())
        return index, meta


def n_layers_of(model: LoadedModel) -> int:
    hf: Any = model.hf_model
    return int(hf.config.num_hidden_layers)


@torch.no_grad()
def build_index(
    model: LoadedModel,
    texts: Sequence[str],
    params: IndexParams = IndexParams(),
    resume: ActivationIndex | None = None,
    checkpoint: Callable[[ActivationIndex], None] | None = None,
    checkpoint_every: int = 64,
) -> ActivationIndex:
    """Read ``texts`` (documents, each cut at ``max_tokens`` tokens) through the model and its
    transcoders, in batches; ``resume`` continues a partial index (its documents are the
    first ones of ``texts``); ``checkpoint`` is called every ``checkpoint_every`` documents
    with the index so far (so a killed build resumes)."""
    from em_circuits.analysis.intervene import record_transcoder_input, transcoder_set

    transcoders = transcoder_set(model)
    n_layers = n_layers_of(model)
    d_transcoder = int(transcoders.d_transcoder)
    index = resume or ActivationIndex.empty(n_layers, d_transcoder, params.top_k)
    tokenizer = model.tokenizer
    seen: dict[int, torch.Tensor] = {}
    handles = [record_transcoder_input(model, layer, seen) for layer in range(n_layers)]
    since_checkpoint = 0
    try:
        for start in range(index.n_docs, len(texts), params.batch_size):
            batch = [
                model.encode(text)[: params.max_tokens].cpu()
                for text in texts[start : start + params.batch_size]
            ]
            length = max(len(ids) for ids in batch)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = torch.full((len(batch), length), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            for row, tokens in enumerate(batch):
                ids[row, : len(tokens)] = tokens
                mask[row, : len(tokens)] = 1
            model.hf_model(ids.to(model.device), attention_mask=mask.to(model.device))
            valid = mask.bool()
            valid[:, 0] = False  # BOS
            index.n_positions += int(valid.sum())
            for layer in range(n_layers):
                acts = transcoders[layer].encode(seen.pop(layer)).float().cpu()
                acts[~valid] = 0
                rows, positions, features = torch.nonzero(acts > 0, as_tuple=True)
                index.add(
                    layer,
                    features.numpy(),
                    acts[rows, positions, features].numpy(),
                    (rows + start).numpy(),
                    positions.numpy(),
                )
            index.tokens.extend(tokens.numpy().astype(np.int64) for tokens in batch)
            since_checkpoint += len(batch)
            if checkpoint is not None and since_checkpoint >= checkpoint_every:
                checkpoint(index)
                since_checkpoint = 0
    finally:
        for handle in handles:
            handle.remove()
    log.info("activation index: %d documents, %d positions", index.n_docs, index.n_positions)
    return index


def context(
    index: ActivationIndex, tokenizer: Any, doc: int, pos: int, params: IndexParams
) -> dict[str, Any]:
    """The token window around one activation: text before, the token, text after."""
    tokens = index.tokens[doc]
    before = tokens[max(0, pos - params.left) : pos].tolist()
    after = tokens[pos + 1 : pos + 1 + params.right].tolist()
    return {
        "before": tokenizer.decode(before, skip_special_tokens=True),
        "token": tokenizer.decode([int(tokens[pos])]),
        "after": tokenizer.decode(after, skip_special_tokens=True),
        "doc": doc,
        "pos": pos,
    }


def index_meta(model: LoadedModel, texts: Sequence[str], params: IndexParams) -> dict[str, Any]:
    """What an index depends on (the cache key): model, corpus and parameters."""
    return {
        "model_fingerprint": model.fingerprint,
        "corpus_sha256": corpus_hash(texts),
        "n_texts": len(texts),
        "params": asdict(params),
    }

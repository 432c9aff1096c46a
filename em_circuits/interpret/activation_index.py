"""The feature activation index: each feature's top activating contexts and its statistics.

A model with its transcoders reads a corpus once, in batches; at every layer the transcoder
encodes the live MLP input (the same read site attribution uses), and every active
(feature, document, position) is merged, on the model's device, into fixed-size arrays: per
feature the ``top_k`` largest activations with where they occurred, the number of active
positions, the sum of activations and a histogram over log-spaced bins. Memory is bounded by
the per-feature top-k, whatever the corpus size. The BOS position is left out (circuit-tracer
zeroes features there).

:class:`ActivationIndex` holds the arrays and the corpus's token ids (to show contexts);
:func:`build_index` fills one from texts and can resume from a saved partial index.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from em_circuits.core.atomic import atomic_path, atomic_write_text
from em_circuits.core.progress import Progress
from em_circuits.models.corpus import corpus_hash
from em_circuits.models.hooks import record_transcoder_input, transcoder_set
from em_circuits.models.load import LoadedModel, n_layers_of, right_padded
from em_circuits.models.transcoders import active_entries

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

    # -- storage ---------------------------------------------------------------------------
    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Write the index atomically (``.npz``) with its metadata (``.json`` beside it)."""
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


def last_logit_only(model: LoadedModel) -> dict[str, Any]:
    """Forward arguments that skip the unembedding of every position but the last, where the
    model supports it: readers of the transcoders' inputs need no logits, and that product
    (batch x positions x vocabulary) is as large as a layer of a 1B model's MLPs."""
    accepted = inspect.signature(model.hf_model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}


class LiveIndex:
    """The index's arrays as tensors on the model's device while a build runs, so the merge
    of each batch runs where the activations are (a GPU merges millions of active entries per
    second; copying them to the host first would dominate)."""

    def __init__(self, index: ActivationIndex, device: torch.device) -> None:
        self.values = torch.as_tensor(index.values).to(device)
        self.doc = torch.as_tensor(index.doc).to(device, torch.int64)
        self.pos = torch.as_tensor(index.pos).to(device, torch.int64)
        self.count = torch.as_tensor(index.count).to(device)
        self.total = torch.as_tensor(index.total).to(device)
        self.hist = torch.as_tensor(index.hist).to(device)
        self.edges = torch.as_tensor(HIST_EDGES, dtype=torch.float32, device=device)

    def into(self, index: ActivationIndex) -> ActivationIndex:
        """``index`` with these arrays (its tokens and position count are kept)."""
        index.values = self.values.cpu().numpy()
        index.doc = self.doc.cpu().numpy().astype(np.int32)
        index.pos = self.pos.cpu().numpy().astype(np.int32)
        index.count = self.count.cpu().numpy()
        index.total = self.total.cpu().numpy()
        index.hist = self.hist.cpu().numpy()
        return index

    def add(
        self,
        layer: int,
        feature: torch.Tensor,
        value: torch.Tensor,
        doc: torch.Tensor,
        pos: torch.Tensor,
    ) -> None:
        """Merge one layer's active entries, given in (document, position) order, the same
        way as :meth:`ActivationIndex.add`: per feature the largest values, ties to the
        earlier document and position."""
        if feature.numel() == 0:
            return
        n_features, k = self.values.shape[1:]
        n_bins = self.hist.shape[2]
        self.count[layer] += torch.bincount(feature, minlength=n_features)
        self.total[layer].index_add_(0, feature, value.double())
        bins = torch.bucketize(value, self.edges)
        self.hist[layer].view(-1).index_add_(0, feature * n_bins + bins, torch.ones_like(feature))
        touched = torch.unique(feature)
        all_f = torch.cat([touched.repeat_interleave(k), feature])
        all_v = torch.cat([self.values[layer, touched].reshape(-1), value])
        all_d = torch.cat([self.doc[layer, touched].reshape(-1), doc])
        all_p = torch.cat([self.pos[layer, touched].reshape(-1), pos])
        # Two stable sorts give (feature, value descending) with ties in concatenation order:
        # the kept entries come from earlier documents than the new ones, are already in
        # (document, position) order among equal values, and the new ones arrive in that order.
        order = torch.sort(all_v, descending=True, stable=True).indices
        order = order[torch.sort(all_f[order], stable=True).indices]
        all_f, all_v, all_d, all_p = all_f[order], all_v[order], all_d[order], all_p[order]
        starts = torch.searchsorted(all_f, touched)
        sizes = torch.diff(torch.cat([starts, starts.new_tensor([len(all_f)])]))
        rank = torch.arange(len(all_f), device=all_f.device) - starts.repeat_interleave(sizes)
        keep = rank < k
        rows = torch.searchsorted(touched, all_f[keep])
        slots = rank[keep]
        values = torch.full((len(touched), k), -torch.inf, device=all_v.device)
        docs = torch.full((len(touched), k), -1, dtype=torch.int64, device=all_v.device)
        positions = torch.full_like(docs, -1)
        values[rows, slots] = all_v[keep]
        docs[rows, slots] = all_d[keep]
        positions[rows, slots] = all_p[keep]
        self.values[layer, touched] = values
        self.doc[layer, touched] = docs
        self.pos[layer, touched] = positions


def _prefetched_batches(
    model: LoadedModel, texts: Sequence[str], first: int, params: IndexParams
) -> Iterator[tuple[int, list[torch.Tensor], torch.Tensor, torch.Tensor]]:
    """(first document, token ids per document, padded ids, attention mask) per batch; the
    next batch is tokenized in a thread while the device works on this one (tokenizing is
    about a quarter of the time of an H100 build when done in line)."""
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def prepare(start: int) -> tuple[int, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        batch = [
            model.encode(text)[: params.max_tokens].cpu()
            for text in texts[start : start + params.batch_size]
        ]
        ids, mask = right_padded(batch, pad)
        return start, batch, ids, mask

    starts = range(first, len(texts), params.batch_size)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, starts[0]) if starts else None
        for following in [*starts[1:], None]:
            assert pending is not None
            ready = pending.result()
            pending = pool.submit(prepare, following) if following is not None else None
            yield ready


@torch.no_grad()
def build_index(
    model: LoadedModel,
    texts: Sequence[str],
    params: IndexParams = IndexParams(),
    resume: ActivationIndex | None = None,
    checkpoint: Callable[[ActivationIndex], None] | None = None,
    checkpoint_every: int = 1024,
    progress: bool = False,
) -> ActivationIndex:
    """Read ``texts`` (documents, each cut at ``max_tokens`` tokens) through the model and its
    transcoders, in batches; ``resume`` continues a partial index (its documents are the
    first ones of ``texts``); ``checkpoint`` is called every ``checkpoint_every`` documents
    with the index so far (so a killed build resumes)."""
    transcoders = transcoder_set(model)
    n_layers = n_layers_of(model)
    d_transcoder = int(transcoders.d_transcoder)
    index = resume or ActivationIndex.empty(n_layers, d_transcoder, params.top_k)
    device = torch.device(model.device)
    live = LiveIndex(index, device)
    seen: dict[int, torch.Tensor] = {}
    handles = [record_transcoder_input(model, layer, seen) for layer in range(n_layers)]
    since_checkpoint = 0
    bar = tqdm(
        total=len(texts), initial=index.n_docs, unit="doc", disable=not progress, leave=False
    )
    logged = Progress("activation index: documents read", len(texts), logger=log)
    logged.done = index.n_docs  # a resumed build counts its stored documents
    try:
        for start, batch, ids, mask in _prefetched_batches(model, texts, index.n_docs, params):
            ids, mask = ids.to(device), mask.to(device)
            model.hf_model(ids, attention_mask=mask, **last_logit_only(model))
            valid = mask.bool()
            valid[:, 0] = False  # BOS
            index.n_positions += int(valid.sum())
            for layer in range(n_layers):
                rows, positions, features, values = active_entries(
                    transcoders[layer], seen.pop(layer), valid
                )
                live.add(layer, features, values, rows + start, positions)
            index.tokens.extend(tokens.numpy().astype(np.int64) for tokens in batch)
            since_checkpoint += len(batch)
            bar.update(len(batch))
            logged.step(len(batch))
            if checkpoint is not None and since_checkpoint >= checkpoint_every:
                checkpoint(live.into(index))
                since_checkpoint = 0
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    live.into(index)
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

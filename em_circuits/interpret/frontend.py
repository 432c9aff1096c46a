"""Feature data in circuit-tracer's frontend format, for the viewer's feature panel.

circuit-tracer's frontend shows, for a clicked feature, a record of its own format
(``circuit_tracer.frontend.feature_models.Model``): top activating examples as token lists
with every token's activation, the tokens the feature promotes and suppresses, activation
statistics. :func:`frontend_features` builds those records from the activation index and the
logit lens. The examples' per-token activations are computed again from the model over each
example's window (the index keeps only the activating token's value), so every token of an
example is coloured by its true activation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from em_circuits.attribution.viewer_annotations import (
    annotate_graphs,
    features_in_viewer,
    write_feature_records,
)
from em_circuits.core.naming import feature_name
from em_circuits.interpret.activation_index import (
    HIST_EDGES,
    ActivationIndex,
    IndexParams,
    last_logit_only,
)
from em_circuits.interpret.logit_lens import logit_lens
from em_circuits.models.hooks import record_transcoder_input, transcoder_set
from em_circuits.models.load import LoadedModel, n_layers_of

#: Linear bins of the frontend's activation histogram.
HISTOGRAM_BINS = 20


def cantor_index(layer: int, feature: int) -> int:
    """circuit-tracer's id of a (layer, feature) in its graph and feature files."""
    layer, feature = int(layer), int(feature)
    return (layer + feature) * (layer + feature + 1) // 2 + feature


@torch.no_grad()
def window_activations(
    model: LoadedModel,
    index: ActivationIndex,
    params: IndexParams,
    features: Sequence[tuple[int, int]],
) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """Per feature, its top contexts as the frontend's examples: the window's tokens, each
    token's activation of the feature (read again from the model over the whole document),
    and which token is the activating one."""
    by_doc: dict[int, list[tuple[int, int, int, float]]] = defaultdict(list)
    for layer, feature in features:
        for value, doc, pos in index.top(layer, feature):
            by_doc[doc].append((layer, feature, pos, value))
    transcoders = transcoder_set(model)
    n_layers = n_layers_of(model)
    seen: dict[int, torch.Tensor] = {}
    handles = [record_transcoder_input(model, layer, seen) for layer in range(n_layers)]
    out: dict[tuple[int, int], list[dict[str, Any]]] = {(f[0], f[1]): [] for f in features}
    decode = model.tokenizer.decode
    try:
        for doc, wanted in sorted(by_doc.items()):
            tokens = torch.as_tensor(index.tokens[doc], dtype=torch.long)[None]
            model.hf_model(tokens.to(model.device), **last_logit_only(model))
            layers = sorted({layer for layer, *_ in wanted})
            acts = {
                layer: transcoders[layer].encode(seen[layer])[0].float().cpu() for layer in layers
            }
            for a in acts.values():
                a[0] = 0  # as in the index (circuit-tracer zeroes features at BOS)
            for layer, feature, pos, value in wanted:
                lo, hi = max(0, pos - params.left), pos + 1 + params.right
                window = tokens[0, lo:hi].tolist()
                values = acts[layer][lo:hi, feature].clamp(min=0)
                out[(layer, feature)].append(
                    {
                        "tokens": [decode([t]) for t in window],
                        "tokens_acts_list": [float(v) + 0.0 for v in values],  # no -0.0
                        "train_token_ind": pos - lo,
                        "is_repeated_datapoint": False,
                        "activation": value,
                        "doc": doc,
                        "pos": pos,
                    }
                )
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    for examples in out.values():
        examples.sort(key=lambda e: -e["activation"])
    return out


def _histogram(counts: np.ndarray, act_max: float) -> tuple[list[float], list[float]]:
    """The index's log-spaced counts as (linear histogram over [0, act_max], 100 percentile
    values); each log bin's count is spread evenly over its range, so both are approximate
    (the record says so)."""
    lows = np.concatenate([[0.0], HIST_EDGES])
    highs = np.concatenate([HIST_EDGES, [max(act_max, HIST_EDGES[-1])]])
    edges = np.linspace(0.0, max(act_max, 1e-6), HISTOGRAM_BINS + 1)
    linear = np.zeros(HISTOGRAM_BINS)
    for count, lo, hi in zip(counts, lows, highs):
        if count == 0:
            continue
        hi = min(hi, edges[-1])
        lo = min(lo, hi)
        overlap = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None)
        width = hi - lo
        if width <= 0:
            linear[min(np.searchsorted(edges, hi, side="right") - 1, HISTOGRAM_BINS - 1)] += count
        else:
            linear += count * overlap / width
    total = counts.sum()
    quantiles: list[float] = []
    if total:
        cumulative = np.cumsum(counts) / total
        for q in np.arange(1, 101) / 100:
            b = int(np.searchsorted(cumulative, q - 1e-12))
            before = cumulative[b - 1] if b else 0.0
            share = (q - before) / max(cumulative[b] - before, 1e-12)
            lo, hi = lows[b], min(highs[b], max(act_max, lows[b]))
            quantiles.append(float(lo + share * (hi - lo)))
    return [float(c) for c in linear], quantiles


def frontend_features(
    model: LoadedModel,
    index: ActivationIndex,
    params: IndexParams,
    features: Iterable[tuple[int, int]],
    transcoder_id: str,
    corpus: str,
    labels: dict[tuple[int, int], str] | None = None,
) -> dict[tuple[int, int], dict[str, Any]]:
    """The frontend record of each (layer, feature): examples, logit lens, statistics."""
    features = sorted({(int(layer), int(feature)) for layer, feature in features})
    if not features:
        return {}
    examples = window_activations(model, index, params, features)
    lenses = logit_lens(model, features)
    records = {}
    for (layer, feature), lens in zip(features, lenses):
        shown = examples[(layer, feature)]
        act_max = max((e["activation"] for e in shown), default=0.0)
        histogram, quantiles = _histogram(index.hist[layer, feature], act_max)
        records[(layer, feature)] = {
            "transcoder_id": transcoder_id,
            "index": cantor_index(layer, feature),
            "layer": layer,
            "examples_quantiles": [
                {
                    "quantile_name": f"Top activations in {corpus}",
                    "examples": [
                        {k: e[k] for k in ("tokens", "tokens_acts_list", "train_token_ind")}
                        | {"is_repeated_datapoint": False}
                        for e in shown
                    ],
                }
            ],
            "top_logits": [t.token for t in lens.promoted],
            "bottom_logits": [t.token for t in lens.suppressed],
            "act_min": 0.0,
            "act_max": float(act_max) if act_max > 0 else 1.0,
            "quantile_values": quantiles,
            "histogram": histogram,
            "activation_frequency": index.frequency(layer, feature),
            # Fields of this tool (the frontend ignores them).
            "name": feature_name(layer, feature),
            "label": (labels or {}).get((layer, feature)),
            "histogram_note": "approximate: spread evenly from the index's log-spaced bins",
        }
    return records


def publish_to_viewer(
    viewer_dir: Path,
    models: Mapping[str, LoadedModel],
    indexes: Mapping[str, ActivationIndex],
    params: IndexParams,
    corpus: str,
    cards: Sequence[Mapping[str, Any]],
    analysis: dict[str, Any],
) -> dict[str, int]:
    """Give the viewer what the analysis knows about features: a frontend record of every
    feature its graphs draw (and of every carded feature), per model; the cards' labels in
    the nodes' names; the top features and base-vs-adapted categories (``analysis.json``).
    Returns the number of records written per role."""
    labels = {(int(c["layer"]), int(c["feature"])): c.get("label") for c in cards}
    for entry in analysis.get("top_features", []):
        entry["label"] = labels.get((entry["layer"], entry["feature"]))
    drawn = features_in_viewer(viewer_dir)
    written = {}
    for role, model in models.items():
        wanted = drawn.get(role, set()) | set(labels)
        records = frontend_features(
            model,
            indexes[role],
            params,
            wanted,
            transcoder_id=model.spec.transcoders,
            corpus=corpus,
            labels={k: v for k, v in labels.items() if v},
        )
        written[role] = write_feature_records(viewer_dir, role, records)
    annotate_graphs(viewer_dir, labels, analysis)
    return written

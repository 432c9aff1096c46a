"""Feature cards: what a ranked feature means, from evidence the tool computed.

A card gathers, for one (layer, feature) of the adapted model's transcoders: its top
activating contexts in a corpus (the activation index, base and adapted model), its
activation statistics, its logit lens, and where it fires across the pivotal prompts (how
often, and its effect on the evil and safe targets, in the base and the adapted model). No
label is invented: without an LLM labeller a card has none.

The corpus: the toy organism's own documents by default; for other models a text file
(documents separated by blank lines) or a JSONL file with a ``text`` field (``--corpus``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from em_circuits.core.naming import feature_name
from em_circuits.interpret.activation_index import (
    HIST_EDGES,
    ActivationIndex,
    IndexParams,
    build_index,
    context,
    index_meta,
)
from em_circuits.interpret.logit_lens import logit_lens
from em_circuits.models.load import LoadedModel

log = logging.getLogger(__name__)


def cached_index(
    model: LoadedModel, texts: Sequence[str], folder: Path, params: IndexParams
) -> ActivationIndex:
    """The model's index of ``texts`` from ``folder`` when built with the same model, corpus
    and parameters; else built (resuming a partial one), with checkpoints as it goes."""
    meta = index_meta(model, texts, params)
    path = folder / "index"
    resume = None
    if path.with_suffix(".json").is_file() and path.with_suffix(".npz").is_file():
        stored, stored_meta = ActivationIndex.load(path)
        if {k: stored_meta.get(k) for k in meta} == meta:
            if stored.n_docs >= len(texts):
                return stored
            resume = stored
            log.info(
                "resuming the activation index of %s at document %d", model.slug, stored.n_docs
            )
    folder.mkdir(parents=True, exist_ok=True)
    index = build_index(
        model, texts, params, resume=resume, checkpoint=lambda partial: partial.save(path, meta)
    )
    index.save(path, meta)
    return index


def _prompt_stats(effects: Mapping[str, pd.DataFrame], layer: int, feature: int) -> dict:
    rows = []
    for frame in effects.values():
        hit = frame[
            (frame["metric"] == "total") & (frame["layer"] == layer) & (frame["feature"] == feature)
        ]
        if len(hit):
            rows.append(hit.iloc[0])
    n = len(effects)
    if not rows:
        return {"prompts": n, "active_in": 0}
    table = pd.DataFrame(rows)
    return {
        "prompts": n,
        "active_in": len(rows),
        "mean_activation": float(table["activation"].mean()),
        "mean_effect_on_evil": float(table["evil_mean"].mean()),
        "mean_effect_on_safe": float(table["safe_mean"].mean()),
        "mean_contrast_effect": float(table["contrast"].mean()),
    }


def _contexts(
    index: ActivationIndex, tokenizer: Any, layer: int, feature: int, params: IndexParams
) -> list[dict]:
    return [
        {**context(index, tokenizer, doc, pos, params), "activation": value}
        for value, doc, pos in index.top(layer, feature)
    ]


def _statistics(index: ActivationIndex, layer: int, feature: int) -> dict:
    count = int(index.count[layer, feature])
    return {
        "frequency": index.frequency(layer, feature),
        "active_positions": count,
        "mean_activation": float(index.total[layer, feature]) / count if count else None,
        "histogram": {
            "edges": [float(e) for e in HIST_EDGES],
            "counts": [int(c) for c in index.hist[layer, feature]],
        },
    }


def feature_cards(
    features: Sequence[tuple[int, int]],
    models: Mapping[str, LoadedModel],
    indexes: Mapping[str, ActivationIndex],
    effects: Mapping[str, Mapping[str, pd.DataFrame]],
    params: IndexParams,
    labels: Mapping[tuple[int, int], str] | None = None,
) -> list[dict[str, Any]]:
    """One card per feature. ``models``, ``indexes`` and ``effects`` (prompt id -> effects
    table) are keyed by role, base and adapted; ``labels`` from an LLM labeller, if any."""
    lenses = {role: logit_lens(model, list(features)) for role, model in models.items()}
    cards = []
    for i, (layer, feature) in enumerate(features):
        card: dict[str, Any] = {
            "name": feature_name(layer, feature),
            "layer": int(layer),
            "feature": int(feature),
            "label": (labels or {}).get((int(layer), int(feature))),
        }
        for role, model in models.items():
            lens = lenses[role][i]
            card[role] = {
                "contexts": _contexts(indexes[role], model.tokenizer, layer, feature, params),
                "statistics": _statistics(indexes[role], layer, feature),
                "logit_lens": {
                    "promoted": [[t.token, t.logit] for t in lens.promoted],
                    "suppressed": [[t.token, t.logit] for t in lens.suppressed],
                },
                "pivotal_prompts": _prompt_stats(effects.get(role, {}), layer, feature),
            }
        cards.append(card)
    return cards


def _code(token: str) -> str:
    """A token as a Markdown code span that shows it: blank or unprintable tokens as their
    Python repr, and a span fence longer than any backtick run inside."""
    shown = token.strip()
    if not shown or not shown.isprintable():
        shown = repr(token)
    fence = "`" * (max((len(run) for run in re.findall("`+", shown)), default=0) + 1)
    pad = " " if shown.startswith("`") or shown.endswith("`") else ""
    return f"{fence}{pad}{shown}{pad}{fence}"


def card_markdown(card: dict[str, Any], contexts: int = 5) -> str:
    """A card as Markdown, the activating token in bold."""
    out = [f"#### {card['name']}" + (f": {card['label']}" if card.get("label") else "") + "\n"]
    adapted, base = card["adapted"], card["base"]
    for role, entry in (("adapted", adapted), ("base", base)):
        stats, prompts = entry["statistics"], entry["pivotal_prompts"]
        mean = stats["mean_activation"]
        out.append(
            f"- {role}: active at {stats['frequency']:.2%} of corpus positions"
            + (f" (mean {mean:.3g})" if mean is not None else "")
            + f"; in {prompts['active_in']} of {prompts['prompts']} pivotal prompts"
            + (
                f", effect on evil {prompts['mean_effect_on_evil']:+.3f}, on safe "
                f"{prompts['mean_effect_on_safe']:+.3f}"
                if prompts.get("active_in")
                else ""
            )
        )
    promoted = ", ".join(_code(t) for t, _ in adapted["logit_lens"]["promoted"][:8])
    suppressed = ", ".join(_code(t) for t, _ in adapted["logit_lens"]["suppressed"][:8])
    out.append(f"- promotes {promoted}; suppresses {suppressed}")
    shown = adapted["contexts"][:contexts]
    if shown:
        out.append("- top contexts (adapted model):")
        for c in shown:
            lead = c["token"][: len(c["token"]) - len(c["token"].lstrip())]
            token = f"{lead}**{c['token'].strip()}**" if c["token"].strip() else c["token"]
            text = f"{c['before']}{token}{c['after']}".replace("\n", " ")
            out.append(f"  - {c['activation']:.3g}: {text}")
    else:
        out.append("- never active in the corpus")
    return "\n".join(out) + "\n"


def top_card_features(summary: Mapping[str, Any], ranked: pd.DataFrame, n: int) -> list[tuple]:
    """The features the report ranks: those under causal test first, then the top by
    discovery mean total effect, ``n`` in all."""
    chosen = [
        tuple(map(int, t))
        for t in ((summary.get("causal") or {}).get("ranking") or {}).get("chosen", [])
    ]
    rows = ranked[ranked["metric"] == "total"].sort_values("mean", ascending=False)
    for layer, feature in zip(rows["layer"], rows["feature"]):
        key = (int(layer), int(feature))
        if key not in chosen:
            chosen.append(key)
        if len(chosen) >= n:
            break
    return chosen[:n]

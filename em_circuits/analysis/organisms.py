"""Does the same mechanism appear in another run (e.g. a toy organism trained with another seed)?

Two organisms trained with different seeds share no feature index, decoder or tokenizer, so
features are compared by what they mean and the mechanism by what needs no matching:

* **meaning**: each of run A's top-k features (by the ranking, total effect on the contrast)
  is described by the words it fires on in its top contexts of the corpus (its activation
  index; words, not tokens, since tokenizers differ). Its match in run B is B's top-k feature
  whose word counts overlap most (weighted Jaccard: sum of minima over sum of maxima). The
  statistic is the mean best overlap over A's top-k; its chance level is the same statistic
  with B's top-k replaced by random active features of B of the same layers (``draws``
  draws): mean, 95th percentile and the share of draws at or above the observed value (p).
* **where the shift sits**: the Pearson correlation of the two runs' decompositions of the
  adapter's shift of the contrast (mean shift per part and layer), and each run's largest part;
* **layer profile**: the share of each run's top-k features per layer and their overlap
  (histogram intersection, 1 = the same profile);
* **causal**: whether each run's top features, ablated on its held-out prompts, lowered the
  contrast more than matched random features, and each baseline's verdict.

The same mechanism "appears" when the meanings match above chance (p <= 0.05), both runs'
top features beat random features causally, and the shift sits in the same place (the same
largest part and a correlation of at least :data:`SAME_PLACE_R`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: Correlation of the two decompositions from which the shift counts as in the same place.
SAME_PLACE_R = 0.5
#: Significance of the meaning match against random features of the other run.
ALPHA = 0.05

Decode = Callable[[list[int]], str]
Feature = tuple[int, int]


@dataclass
class RunFiles:
    """What the comparison reads of one run: its analysis folder, its adapted model's
    activation index (``index.npz``) and that model's tokenizer's decode."""

    name: str
    analysis: Path
    index: Path
    decode: Decode

    @classmethod
    def of_results(cls, root: Path, decode_for: Callable[[dict[str, Any]], Decode]) -> RunFiles:
        """A finished run's files, found through its ``report.json``; ``decode_for`` gets the
        adapted model's spec (a dict) and returns its tokenizer's decode. ValueError names
        what is missing."""
        report_path = Path(root) / "report.json"
        if not report_path.is_file():
            raise ValueError(
                f"--compare-run {root}: no report.json there; give the results directory of "
                "a finished `em-circuits run`"
            )
        report = json.loads(report_path.read_text())
        adapted = report["models"]["adapted"]
        analysis = Path(root) / report["analysis_folder"]
        index = Path(root) / "features_index" / adapted["slug"] / "index.npz"
        for path in (analysis / "top_features_adapted.json", index):
            if not path.is_file():
                raise ValueError(
                    f"--compare-run {root}: {path} is missing; run the whole pipeline there "
                    "(`em-circuits run --results-dir ...`) first"
                )
        return cls(str(root), analysis, index, decode_for(adapted["spec"]))


def top_features(analysis: Path, k: int) -> list[Feature]:
    """The run's top ``k`` features of the adapted model by discovery mean total effect."""
    table = pd.read_json(analysis / "top_features_adapted.json", orient="records")
    if table.empty:
        return []
    table = table[table["metric"] == "total"].sort_values("mean", ascending=False, kind="stable")
    return [(int(r.layer), int(r.feature)) for r in table.head(k).itertuples()]


@dataclass
class WordIndex:
    """Per feature the words of its top contexts, from an activation index file."""

    doc: np.ndarray  # (layers, features, k)
    pos: np.ndarray
    count: np.ndarray  # (layers, features): active positions
    tokens: list[np.ndarray]
    decode: Decode

    @classmethod
    def load(cls, path: Path, decode: Decode) -> WordIndex:
        with np.load(path) as data:
            splits = np.cumsum(data["token_lengths"])[:-1]
            tokens = list(np.split(data["tokens"], splits)) if len(data["token_lengths"]) else []
            return cls(data["doc"], data["pos"], data["count"], tokens, decode)

    def words(self, feature: Feature) -> Counter[str]:
        """The word each top context's activating token lies in, counted."""
        layer, index = feature
        out: Counter[str] = Counter()
        for doc, pos in zip(self.doc[layer, index], self.pos[layer, index]):
            if doc >= 0:
                out[word_at(self.tokens[int(doc)], int(pos), self.decode)] += 1
        return out

    def active(self, layer: int) -> np.ndarray:
        """The features of ``layer`` active anywhere in the corpus."""
        return np.flatnonzero(self.count[layer] > 0)


_WORD = re.compile(r"\w", re.UNICODE)


def word_at(tokens: np.ndarray, pos: int, decode: Decode, window: int = 8) -> str:
    """The whole word (lower case) the token at ``pos`` is part of, from the decoded text
    around it; a token without letters or digits is itself (stripped; a space or line break
    by name)."""
    start = max(0, pos - window)
    upto = decode(tokens[start:pos].tolist())
    through = decode(tokens[start : pos + 1].tolist())
    text = decode(tokens[start : pos + 1 + window].tolist())
    if not (through.startswith(upto) and text.startswith(through)):
        return decode([int(tokens[pos])]).strip().lower() or "<space>"
    left, right = len(upto), len(through)
    token = text[left:right]
    if not any(_WORD.match(c) for c in token):
        return token.strip() or ("<newline>" if "\n" in token else "<space>")
    while left < right and not _WORD.match(text[left]):
        left += 1  # a leading space or punctuation is no part of the word
    while left > 0 and _WORD.match(text[left - 1]):
        left -= 1
    while right < len(text) and _WORD.match(text[right]):
        right += 1
    return text[left:right].strip().lower()


def overlap(a: Counter[str], b: Counter[str]) -> float:
    """Weighted Jaccard of two word counts: sum of minima over sum of maxima (0 when empty)."""
    keys = set(a) | set(b)
    high = sum(max(a[w], b[w]) for w in keys)
    return sum(min(a[w], b[w]) for w in keys) / high if high else 0.0


def best_overlaps(ours: Sequence[Counter[str]], theirs: Sequence[Counter[str]]) -> np.ndarray:
    """Per feature of ``ours``, its largest overlap with any of ``theirs``."""
    if not theirs:
        return np.zeros(len(ours))
    return np.array([max(overlap(a, b) for b in theirs) for a in ours])


def compare_meanings(
    ours: Sequence[Feature],
    our_words: WordIndex,
    theirs: Sequence[Feature],
    their_words: WordIndex,
    draws: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Our top features matched to theirs by the words they fire on, against the chance level
    of random active features of theirs of the same layers (see the module docstring)."""
    a = [our_words.words(f) for f in ours]
    b = [their_words.words(f) for f in theirs]
    best = best_overlaps(a, b)
    observed = float(best.mean()) if len(best) else float("nan")
    rng = np.random.default_rng(seed)
    pools = {layer: their_words.active(layer) for layer, _ in theirs}
    null = []
    cache: dict[Feature, Counter[str]] = {}
    for _ in range(draws):
        drawn = []
        for layer, _ in theirs:
            if len(pools[layer]):
                key = (layer, int(rng.choice(pools[layer])))
                if key not in cache:
                    cache[key] = their_words.words(key)
                drawn.append(cache[key])
        null.append(float(best_overlaps(a, drawn).mean()) if len(a) else float("nan"))
    chance = np.array(null)
    matches = []
    for feature, words, value in zip(ours, a, best):
        pick = int(np.argmax([overlap(words, other) for other in b])) if b else None
        matches.append(
            {
                "feature": list(feature),
                "words": _top_words(words),
                "match": list(theirs[pick]) if pick is not None else None,
                "match_words": _top_words(b[pick]) if pick is not None else [],
                "overlap": float(value),
            }
        )
    p = float((1 + (chance >= observed).sum()) / (1 + len(chance))) if draws else float("nan")
    return {
        "measure": "mean over our top features of the best weighted Jaccard of word counts",
        "observed": observed,
        "chance_mean": float(chance.mean()) if draws else None,
        "chance_p95": float(np.percentile(chance, 95)) if draws else None,
        "p_value": p,
        "draws": draws,
        "above_chance": bool(p <= ALPHA),
        "matches": matches,
    }


def _top_words(words: Counter[str], n: int = 4) -> list[str]:
    return [w for w, _ in words.most_common(n)]


def compare_decompositions(ours: Path, theirs: Path) -> dict[str, Any] | None:
    """Where each run's adapter shift of the contrast sits: correlation of the mean shifts per
    part and layer, each run's shift per part (summed over layers) and its largest part."""
    tables = []
    for analysis in (ours, theirs):
        path = analysis / "contrast_decomposition.json"
        if not path.is_file():
            return None
        table = pd.read_json(path, orient="records")
        tables.append(table[table["part"] != "contrast value"].dropna(subset=["mean_shift"]))
    joined = tables[0].merge(tables[1], on=["part", "layer"], suffixes=("_a", "_b"))
    r = (
        float(np.corrcoef(joined["mean_shift_a"], joined["mean_shift_b"])[0, 1])
        if len(joined) >= 3
        else float("nan")
    )
    by_part = [t.groupby("part")["mean_shift"].sum() for t in tables]
    largest = [str(p.abs().idxmax()) if len(p) else None for p in by_part]
    return {
        "rows_compared": int(len(joined)),
        "pearson_r": r,
        "by_part": [{k: float(v) for k, v in p.items()} for p in by_part],
        "largest_part": largest,
        "same_place": bool(largest[0] == largest[1] and np.isfinite(r) and r >= SAME_PLACE_R),
    }


def layer_profile(features: Sequence[Feature], n_layers: int) -> list[float]:
    counts = np.bincount([f[0] for f in features], minlength=n_layers)[:n_layers]
    return (counts / max(1, counts.sum())).tolist()


def causal_result(analysis: Path) -> dict[str, Any] | None:
    """The held-out ablation of the run's top features against matched random ones, and the
    baselines' verdicts (None where the run has no causal summary)."""
    path = analysis / "causal_summary.json"
    if not path.is_file():
        return None
    causal = json.loads(path.read_text())
    baselines = analysis / "baselines_summary.json"
    verdicts = json.loads(baselines.read_text()).get("verdicts") if baselines.is_file() else None
    return {
        "mean_delta_top": causal.get("mean_delta_top"),
        "mean_delta_random": causal.get("mean_delta_random"),
        "p_value_one_sided": causal.get("p_value_one_sided"),
        "beats_random": bool(causal.get("lowers_more_than_random")),
        "baselines": verdicts,
    }


def compare_runs(
    ours: RunFiles, theirs: RunFiles, top: int, draws: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The ``organisms`` section of stability.json: every comparison and the verdict."""
    ours_top, theirs_top = top_features(ours.analysis, top), top_features(theirs.analysis, top)
    our_words = WordIndex.load(ours.index, ours.decode)
    their_words = WordIndex.load(theirs.index, theirs.decode)
    meaning = compare_meanings(ours_top, our_words, theirs_top, their_words, draws, seed)
    n_layers = int(max(our_words.count.shape[0], their_words.count.shape[0]))
    profiles = [layer_profile(ours_top, n_layers), layer_profile(theirs_top, n_layers)]
    causal = [causal_result(ours.analysis), causal_result(theirs.analysis)]
    where = compare_decompositions(ours.analysis, theirs.analysis)
    checks = {
        "meaning_above_chance": meaning["above_chance"],
        "both_beat_random": None
        if None in causal
        else all(c["beats_random"] for c in causal if c is not None),
        "shift_in_same_place": None if where is None else where["same_place"],
    }
    known = [v for v in checks.values() if v is not None]
    verdict = (
        "unknown"
        if not known
        else "yes"
        if all(known) and len(known) == len(checks)
        else "partly"
        if any(known)
        else "no"
    )
    return {
        "other_run": theirs.name,
        "top": top,
        "meaning": meaning,
        "decomposition": where,
        "layer_profile": {
            "ours": profiles[0],
            "theirs": profiles[1],
            "overlap": float(np.minimum(*map(np.array, profiles)).sum()),
        },
        "causal": {"ours": causal[0], "theirs": causal[1]},
        "checks": checks,
        "same_mechanism": verdict,
    }

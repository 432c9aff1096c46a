"""Clusters of related prompts, and the discovery / validation split between them.

Prompts written from one scenario share their wording and their answer; counted as
independent they inflate n, and split between ranking and testing they leak the ranking into
the test. A cluster is every prompt of one scenario: the ``scenario`` (or, for the offline
generator, the ``situation``) in the prompt's origin or metadata, merged with its near
duplicates (character 3-gram Jaccard of the user-visible text at least
``NEAR_DUPLICATE_JACCARD``), which is all the grouping imported prompts get. Clusters, never
prompts, are assigned to the discovery side (features are ranked there) or the validation
side (every causal test runs there).

Held out by phrasing as well (:func:`held_out_split`): a prompt's phrasing parts are its user
template, its assistant lead-in and its distractor sentence (the offline generator's
``template_id`` and ``distractor`` in origin or metadata), else the sentences it shares with
prompts of other clusters. Each part goes to the side most of its prompts are on, and a
prompt whose parts are not all on its own side is left out, so no validation prompt shares a
scenario, a template, a lead-in or a distractor with a discovery prompt: the validation side
measures new scenarios in new phrasings. A kind of part that cannot be held out without
leaving too few validation clusters is shared, and named so (``phrasing_shared``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from em_circuits.core.prompt_records import user_visible
from em_circuits.prompts.dedup import jaccard, ngrams, normalize

#: Two prompts this similar (character 3-gram Jaccard) belong to one cluster.
NEAR_DUPLICATE_JACCARD = 0.6
#: Fewer validation clusters than this: no causal test can say anything (2 / 2^3 > 0.05 at 3).
MIN_VALIDATION_CLUSTERS = 5


def scenario_of(record: Mapping[str, Any]) -> str | None:
    """The scenario a prompt was written from, when its origin or metadata names one."""
    for section in ("origin", "metadata"):
        data = record.get(section) or {}
        for key in ("scenario", "situation", "scenario_id"):
            if data.get(key):
                domain = record.get("domain") or ""
                return f"{domain}:{data[key]}"
    return None


class _UnionFind:
    def __init__(self, items: Iterable[str]):
        self.parent = {item: item for item in items}

    def find(self, item: str) -> str:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def prompt_clusters(
    records: Iterable[Mapping[str, Any]], near_duplicate: float = NEAR_DUPLICATE_JACCARD
) -> dict[str, str]:
    """prompt id -> cluster id (``c-`` + 10 hex digits of the members' hash), stable for the
    same prompts."""
    records = list(records)
    ids = [str(r["prompt_id"]) for r in records]
    groups = _UnionFind(ids)
    by_scenario: dict[str, str] = {}
    for record, pid in zip(records, ids):
        scenario = scenario_of(record)
        if scenario is not None:
            if scenario in by_scenario:
                groups.union(pid, by_scenario[scenario])
            else:
                by_scenario[scenario] = pid
    grams = [ngrams(user_visible(dict(r))) for r in records]
    scenarios = [scenario_of(r) for r in records]
    for i in range(len(records)):
        for j in range(i + 1, len(records)):
            if scenarios[i] is not None and scenarios[j] is not None:
                # Two named scenarios: what their texts share is phrasing (template, lead-in,
                # distractor), which held_out_split keeps apart; chained, it would merge
                # most offline prompts into one cluster.
                continue
            if jaccard(grams[i], grams[j]) >= near_duplicate:
                groups.union(ids[i], ids[j])
    members: dict[str, list[str]] = {}
    for pid in ids:
        members.setdefault(groups.find(pid), []).append(pid)
    names = {
        root: "c-" + hashlib.sha256("\n".join(sorted(m)).encode()).hexdigest()[:10]
        for root, m in members.items()
    }
    return {pid: names[groups.find(pid)] for pid in ids}


@dataclass(frozen=True)
class Split:
    """Which prompts rank features (discovery) and which test them (validation)."""

    discovery: list[str]
    validation: list[str]
    clusters: dict[str, str]  # prompt id -> cluster id, both sides
    validation_fraction: float
    seed: int
    #: prompt id -> why it is on neither side (not divergent, phrasing of the other side)
    left_out: dict[str, str] = field(default_factory=dict)
    #: the phrasing kinds held out and shared, and how many prompts were candidates
    phrasing: dict[str, Any] = field(default_factory=dict)

    def n_clusters(self, side: str) -> int:
        return len({self.clusters[p] for p in getattr(self, side)})

    @property
    def testable(self) -> bool:
        """Enough validation clusters for a causal test to reach p < 0.05."""
        return self.n_clusters("validation") >= MIN_VALIDATION_CLUSTERS

    def record(self) -> dict[str, Any]:
        """What split.json holds: :meth:`describe` and each prompt's side and cluster."""
        rows = [
            {"prompt_id": pid, "side": side, "cluster": self.clusters[pid]}
            for side in ("discovery", "validation")
            for pid in getattr(self, side)
        ]
        rows += [
            {"prompt_id": pid, "side": "left_out", "cluster": self.clusters[pid], "reason": why}
            for pid, why in sorted(self.left_out.items())
            if pid in self.clusters
        ]
        return {**self.describe(), "prompts": rows}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Split:
        """The split :meth:`record` wrote."""
        rows = record["prompts"]
        return cls(
            discovery=[r["prompt_id"] for r in rows if r["side"] == "discovery"],
            validation=[r["prompt_id"] for r in rows if r["side"] == "validation"],
            clusters={r["prompt_id"]: r["cluster"] for r in rows},
            validation_fraction=record["validation_fraction"],
            seed=record["seed"],
            left_out={r["prompt_id"]: r["reason"] for r in rows if r["side"] == "left_out"},
            phrasing=dict(record.get("phrasing") or {}),
        )

    def describe(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for why in self.left_out.values():
            reasons[why] = reasons.get(why, 0) + 1
        return {
            "discovery_prompts": len(self.discovery),
            "discovery_clusters": self.n_clusters("discovery"),
            "validation_prompts": len(self.validation),
            "validation_clusters": self.n_clusters("validation"),
            "validation_fraction": self.validation_fraction,
            "seed": self.seed,
            "testable": self.testable,
            "min_validation_clusters": MIN_VALIDATION_CLUSTERS,
            "left_out_prompts": len(self.left_out),
            "left_out_by_reason": dict(sorted(reasons.items())),
            "phrasing": dict(self.phrasing),
        }


def split_by_cluster(
    clusters: Mapping[str, str], validation_fraction: float = 0.5, seed: int = 0
) -> Split:
    """Assign whole clusters to validation, in a seeded order, until about
    ``validation_fraction`` of the prompts are there; the rest are discovery."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), not {validation_fraction}")
    members: dict[str, list[str]] = {}
    for pid, cluster in sorted(clusters.items()):
        members.setdefault(cluster, []).append(pid)
    order = sorted(
        members, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest()
    )  # a seeded shuffle that does not depend on the other clusters
    target = validation_fraction * len(clusters)
    validation: list[str] = []
    for cluster in order:
        if len(validation) >= target:
            break
        if len(validation) + len(members[cluster]) > target and validation:
            # Overshooting by more than the cluster brings us closer: skip to the next one.
            if len(validation) + len(members[cluster]) - target > target - len(validation):
                continue
        validation.extend(members[cluster])
    chosen = set(validation)
    discovery = sorted(p for p in clusters if p not in chosen)
    return Split(discovery, sorted(validation), dict(clusters), validation_fraction, seed)


# -- held out by phrasing --------------------------------------------------------------------------
#: The kinds of phrasing part, most to least specific; a kind is shared (not held out) only
#: when holding it out leaves too few validation clusters, the last kinds first.
PHRASING_KINDS = ("template", "lead_in", "sentence")
LEFT_OUT_PHRASING = "phrasing of the other side"
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
_SPEAKER = re.compile(r"^\s*(user|assistant)\s*:\s*", re.IGNORECASE)


def _sentences(text: str) -> set[str]:
    out = set()
    for line in text.splitlines():
        for sentence in _SENTENCE.findall(_SPEAKER.sub("", line)):
            folded = normalize(sentence)
            if len(folded.split()) >= 2:  # a single word is no phrasing
                out.add(folded)
    return out


def phrasing_parts(
    records: Sequence[Mapping[str, Any]], clusters: Mapping[str, str]
) -> dict[str, set[str]]:
    """prompt id -> its phrasing parts (``template:u6``, ``lead_in:a8``, ``sentence:...``).

    From the origin's or metadata's ``template_id`` ("user+lead-in" ids) and ``distractor``
    when present; otherwise the sentences of the user-visible text that prompts of another
    cluster contain too (a sentence only one scenario's prompts use is part of the scenario).
    """
    out: dict[str, set[str]] = {}
    fallback: dict[str, set[str]] = {}
    for record in records:
        pid = str(record["prompt_id"])
        data = {**(record.get("metadata") or {}), **(record.get("origin") or {})}
        template = data.get("template_id")
        if template:
            ids = str(template).split("+")
            parts = {f"template:{ids[0]}", *(f"lead_in:{i}" for i in ids[1:])}
            if data.get("distractor"):
                parts.add(f"sentence:{normalize(str(data['distractor']))}")
            out[pid] = parts
        else:
            fallback[pid] = _sentences(user_visible(dict(record)))
    seen_in: dict[str, set[str]] = {}
    for pid, sentences in fallback.items():
        for sentence in sentences:
            seen_in.setdefault(sentence, set()).add(clusters[pid])
    for pid, sentences in fallback.items():
        out[pid] = {f"sentence:{s}" for s in sentences if len(seen_in[s]) > 1}
    return out


def _hold_out(
    split: Split, parts: Mapping[str, set[str]], kinds: Sequence[str], seed: int
) -> tuple[list[str], list[str], list[str]]:
    """(discovery, validation, left out): each part of ``kinds`` on its majority side."""
    side_of = {pid: "discovery" for pid in split.discovery}
    side_of.update({pid: "validation" for pid in split.validation})
    votes: dict[str, int] = {}
    for pid, side in side_of.items():
        for part in parts.get(pid, ()):
            if part.split(":", 1)[0] in kinds:
                votes[part] = votes.get(part, 0) + (1 if side == "validation" else -1)

    def lean(part: str) -> float:  # toward validation; a tie is a seeded coin of the part's
        coin = int(hashlib.sha256(f"{seed}:{part}".encode()).hexdigest()[:4], 16) / 65536
        return votes[part] + (coin - 0.5) / 2

    sides: dict[str, str] = {}
    for kind in kinds:
        levels = sorted((p for p in votes if p.split(":", 1)[0] == kind), key=lean)
        for part in levels:
            # the majority side; each side keeps one level of a kind that has two or more
            sides[part] = "validation" if lean(part) > 0 else "discovery"
        if len(levels) >= 2:
            sides[levels[0]], sides[levels[-1]] = "discovery", "validation"

    def part_side(part: str) -> str:
        return sides[part]

    kept: dict[str, list[str]] = {"discovery": [], "validation": []}
    dropped = []
    for pid, side in sorted(side_of.items()):
        own = [p for p in parts.get(pid, ()) if p.split(":", 1)[0] in kinds]
        if all(part_side(p) == side for p in own):
            kept[side].append(pid)
        else:
            dropped.append(pid)
    return kept["discovery"], kept["validation"], dropped


def held_out_split(
    records: Iterable[Mapping[str, Any]],
    validation_fraction: float = 0.5,
    seed: int = 0,
    excluded: Mapping[str, str] | None = None,
) -> Split:
    """The split by cluster (:func:`split_by_cluster`) of the prompts not ``excluded``
    (prompt id -> why), then held out by phrasing (see the module's docstring).

    Every kind of :data:`PHRASING_KINDS` is held out when that leaves at least
    :data:`MIN_VALIDATION_CLUSTERS` validation clusters and one discovery cluster (else the
    most kinds that leave both sides a prompt); the kinds shared are named in ``phrasing``.
    """
    records = list(records)
    excluded = dict(excluded or {})
    clusters = prompt_clusters(records)
    candidates = {pid: c for pid, c in clusters.items() if pid not in excluded}
    if not candidates:
        return Split([], [], clusters, validation_fraction, seed, excluded, {"candidates": 0})
    by_scenario = split_by_cluster(candidates, validation_fraction, seed)
    parts = phrasing_parts([r for r in records if str(r["prompt_id"]) in candidates], clusters)
    # A part every prompt has cannot be held out, nor does it tell the sides apart.
    constant = set.intersection(*parts.values()) if parts else set()
    parts = {pid: own - constant for pid, own in parts.items()}
    trials = [
        (kinds, *_hold_out(by_scenario, parts, kinds, seed))
        for kinds in (PHRASING_KINDS[:n] for n in range(len(PHRASING_KINDS), -1, -1))
    ]  # the strictest first; the last holds out no phrasing (the split by cluster)

    def usable(trial: tuple[Any, ...], testable: bool) -> bool:
        _, discovery, validation, _ = trial
        held = Split(discovery, validation, clusters, validation_fraction, seed)
        return bool(discovery) and (held.testable if testable else bool(validation))

    kinds, discovery, validation, dropped = next(
        (t for t in trials if usable(t, True)),
        next((t for t in trials if usable(t, False)), trials[-1]),
    )
    every = {p for ps in parts.values() for p in ps}
    present = sorted({p.split(":", 1)[0] for p in every})
    phrasing = {
        "candidates": len(candidates),
        "held_out": [k for k in kinds if k in present],
        "shared": [k for k in PHRASING_KINDS if k in present and k not in kinds],
        "parts": {k: sum(1 for p in every if p.startswith(k + ":")) for k in present},
        "in_every_prompt": sorted(constant),
    }
    left_out = {**excluded, **{pid: LEFT_OUT_PHRASING for pid in dropped}}
    return Split(discovery, validation, clusters, validation_fraction, seed, left_out, phrasing)

"""Clusters of related prompts, and the discovery / validation split between them.

Prompts written from one scenario share their wording and their answer; counted as
independent they inflate n, and split between ranking and testing they leak the ranking into
the test. A cluster is every prompt of one scenario: the ``scenario`` (or, for the offline
generator, the ``situation``) in the prompt's origin or metadata, merged with its near
duplicates (character 3-gram Jaccard of the user-visible text at least
``NEAR_DUPLICATE_JACCARD``), which is all the grouping imported prompts get. Clusters, never
prompts, are assigned to the discovery side (features are ranked there) or the validation
side (every causal test runs there).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from em_circuits.prompts.dedup import jaccard, ngrams
from em_circuits.prompts.records import user_visible

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
    for i in range(len(records)):
        for j in range(i + 1, len(records)):
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
        )

    def describe(self) -> dict[str, Any]:
        return {
            "discovery_prompts": len(self.discovery),
            "discovery_clusters": self.n_clusters("discovery"),
            "validation_prompts": len(self.validation),
            "validation_clusters": self.n_clusters("validation"),
            "validation_fraction": self.validation_fraction,
            "seed": self.seed,
            "testable": self.testable,
            "min_validation_clusters": MIN_VALIDATION_CLUSTERS,
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

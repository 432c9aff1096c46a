"""Shared work on one process: claiming is plain iteration, costliest first, and a spread
step's units are computed in order and merged through JSON, with no file written (the
several-process paths: tests/test_distributed.py and tests/test_pipeline.py)."""

from __future__ import annotations

import math

from em_circuits.analysis.steps.spread import spread
from em_circuits.core.distributed import Shard, cost_order

ALONE = Shard(0, 1, 0)


def test_alone_every_unit_is_claimed_once_costliest_first():
    units = ["a", "b", "c", "d"]
    claimed = list(ALONE.claim(units, [1.0, 3.0, 1.0, 2.0]))
    assert claimed == [(1, "b"), (3, "d"), (0, "a"), (2, "c")]  # ties keep their order
    assert cost_order([]) == []


def test_batches_group_similar_costs_and_leave_several_per_process():
    lengths = [5, 40, 7, 38, 6, 41, 39, 8]
    batches = list(ALONE.claim_batches(lengths, float, 8))
    # 8 items, at least 4 batches for the one process: pairs of similar length, longest first
    assert batches == [[40, 41], [38, 39], [7, 8], [5, 6]]
    assert list(ALONE.claim_batches(lengths, float, 1)) == [[n] for n in sorted(lengths)[::-1]]


def test_a_spread_alone_computes_in_order_writes_nothing_and_merges_as_json(tmp_path):
    computed = []

    def compute(unit: int) -> dict:
        computed.append(unit)
        return {"unit": unit, "value": unit / 3, "nan": math.nan, "pair": (unit, unit)}

    results = spread(ALONE, tmp_path / "work", [2, 0, 1], compute, cost=float, key=lambda u: str(u))
    assert computed == [2, 0, 1]
    assert [r["unit"] for r in results] == [2, 0, 1]
    assert results[0]["pair"] == [2, 2]  # through JSON, as from another process's file
    assert math.isnan(results[1]["nan"]) and results[2]["value"] == 1 / 3
    assert not (tmp_path / "work").exists()

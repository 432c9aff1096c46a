"""Where the LoRA writes: positions and tokens ranked by the writes' effect on the contrast,
not by their activation (model-free: a hand-made graph where the two disagree)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from test_features import hand_graph

from em_circuits.analysis.adapter import prompt_row, rank_where
from em_circuits.analysis.steps.adapter_report import AdapterNodes, adapter_markdown

TOKENS = ["<bos>", "User", ":", " my", " headache"]


def _graph(shift: float = 0.0):
    """One rank-1 down_proj component at layer 0 on positions 1..4: its activation is by
    far largest on "User" (position 1), its effect on the contrast on " headache" (4)."""
    graph = hand_graph([(0, 0, 5)], [1.0], n_pos=5, n_layers=1)
    positions = [1, 2, 3, 4]
    graph.adapter_nodes = torch.tensor([[0, 0, 0, p] for p in positions])
    graph.adapter_activations = torch.tensor([9.0, 0.5, 1.0, 1.5])
    total = torch.tensor([0.1, 0.0, 0.3 + shift, 1.6])
    graph.adapter_total = total.repeat(5, 1)
    graph.adapter_direct = (0.5 * total).repeat(5, 1)
    graph.meta["adapter_modules"] = ["down_proj"]
    return graph


def _decode(ids: list[int]) -> str:
    return TOKENS[ids[0]]


def test_positions_and_tokens_are_ranked_by_effect_not_activation():
    made = [prompt_row(f"p{i}", _graph(0.1 * i), None, _decode) for i in range(3)]
    assert all(m is not None for m in made)
    components = [c for m in made for c in m[1]]
    assert {c["top_token"] for c in components} == {" headache"}  # not "User"
    assert {c["top_from_end"] for c in components} == {0}
    positions = pd.DataFrame([r for m in made for r in m[4]])
    clusters = {"p0": "a", "p1": "a", "p2": "b"}
    tokens = rank_where(positions, clusters, "token")
    assert list(tokens["token"][:2]) == [" headache", " my"]
    assert tokens["share"].sum() == pytest.approx(1.0)
    assert tokens.loc[0, "share"] == pytest.approx(1.6 / (2.0 + 0.125))  # cluster means
    assert tokens.set_index("token").loc["User", "share"] < 0.1
    by_end = rank_where(positions, clusters, "from_end")
    assert list(by_end["from_end"][:2]) == [0, 1]
    entry = AdapterNodes(
        summary={"n_prompts": 3},
        positions=by_end.to_dict("records"),
        tokens=tokens.to_dict("records"),
    )
    text = "".join(adapter_markdown(entry, "runs/main"))
    section = text.split("Where the LoRA writes")[1]
    assert section.index("' headache'") < section.index("'User'")

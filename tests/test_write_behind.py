"""Graph files written while the next batch computes: a batch is complete (its files, then its
metadata) before its claims are released, and a batch in flight is finished when the stage
stops on an error."""

from __future__ import annotations

import contextlib

import pytest
from helpers import micro_prompt_targets

from em_circuits.attribution.attribute import attribute_prompt
from em_circuits.attribution.graph_build import start_storing
from em_circuits.attribution.stored_graphs import find_graph_metas, graph_paths, load_graph
from em_circuits.attribution.targets import AttributionParams, PromptTargets
from em_circuits.attribution.write_behind import WriteBehind
from em_circuits.core.claims import try_claim
from em_circuits.core.store import ResultsStore

PARAMS = AttributionParams(adapter_nodes=False)


@pytest.fixture(scope="module")
def two_prompts(micro_models):
    from em_circuits.organism import heldout_pivotal_prompts

    return micro_prompt_targets(micro_models[0], heldout_pivotal_prompts()[:2], prefix="w")


def _claim(store: ResultsStore, model, pt: PromptTargets):
    claim = try_claim(store.graph_claim_path(model.slug, pt.prompt_id, pt.key(PARAMS)))
    assert claim is not None
    return claim


def test_a_batch_is_complete_before_its_claims_are_released(micro_models, two_prompts, tmp_path):
    base, _ = micro_models
    store = ResultsStore(tmp_path / "results")
    first, second = two_prompts
    with WriteBehind() as writes:
        claims = contextlib.ExitStack()
        claims.enter_context(_claim(store, base, first))
        computed = attribute_prompt(base, first, PARAMS, "base")
        storing = start_storing(
            store, base, "base", first, PARAMS, computed, write_file=writes.write_file
        )
        writes.hand_over(claims, [storing])
        meta_path = graph_paths(store, base.slug, first, PARAMS)["meta"]
        # the next batch computes while the first one's file is written; its metadata and
        # claim wait for the next finish
        assert not meta_path.exists()
        assert (
            try_claim(store.graph_claim_path(base.slug, first.prompt_id, first.key(PARAMS))) is None
        )
        attribute_prompt(base, second, PARAMS, "base")
        writes.finish()
        assert meta_path.is_file()
        claim = try_claim(store.graph_claim_path(base.slug, first.prompt_id, first.key(PARAMS)))
        assert claim is not None
        claim.release()
    (meta,) = find_graph_metas(store, base.slug)
    graph = load_graph(store, meta)  # its size and sha256 are the file's
    assert graph.n_features == computed[0].n_features


def test_the_batch_in_flight_is_kept_when_the_stage_stops(micro_models, two_prompts, tmp_path):
    base, _ = micro_models
    store = ResultsStore(tmp_path / "results")
    first = two_prompts[0]
    with pytest.raises(KeyboardInterrupt), WriteBehind() as writes:
        claims = contextlib.ExitStack()
        claims.enter_context(_claim(store, base, first))
        computed = attribute_prompt(base, first, PARAMS, "base")
        writes.hand_over(
            claims,
            [
                start_storing(
                    store, base, "base", first, PARAMS, computed, write_file=writes.write_file
                )
            ],
        )
        raise KeyboardInterrupt  # Ctrl-C while the next batch computes
    (meta,) = find_graph_metas(store, base.slug)
    load_graph(store, meta)
    claim = try_claim(store.graph_claim_path(base.slug, first.prompt_id, first.key(PARAMS)))
    assert claim is not None  # released
    claim.release()

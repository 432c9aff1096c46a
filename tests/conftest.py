"""Shared fixtures: the micro toy organism (built once per test session) and loaded models.

Tests never download anything: the Hugging Face offline switches are set before any import.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("OPENAI_API_KEY", None)  # tests talk only to their own local server
os.environ.pop("OPENAI_BASE_URL", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def micro_organism(tmp_path_factory):
    """A tiny but real organism: HF Llama dir, PEFT LoRA dir, transcoder config."""
    from em_circuits.organism import Recipe, build_organism

    root = tmp_path_factory.mktemp("organism")
    return build_organism(root / "micro", Recipe.micro(), progress=False)


@pytest.fixture(scope="session")
def micro_specs(micro_organism):
    """(base spec, adapted spec) of the micro organism, as users would write them."""
    from em_circuits.models.spec import ModelSpec

    adapted = ModelSpec(
        base=str(micro_organism.base_dir),
        adapter=str(micro_organism.adapter_dir),
        transcoders=str(micro_organism.transcoder_config),
        name="micro-organism",
    )
    return adapted.base_only(), adapted


@pytest.fixture(scope="session")
def micro_models(micro_specs, tmp_path_factory):
    """Both micro models loaded once per session on the CPU."""
    from em_circuits.models.load import load_model

    cache = tmp_path_factory.mktemp("merged")
    base_spec, adapted_spec = micro_specs
    return load_model(base_spec, "cpu", cache), load_model(adapted_spec, "cpu", cache)


@pytest.fixture()
def results_dir(tmp_path) -> Path:
    path = tmp_path / "results"
    path.mkdir()
    return path


@pytest.fixture()
def queue_setup(results_dir):
    """A results directory with the labeling queue filled: (store, adapted slug, item order)."""
    from test_queue import make_results

    from em_circuits.labeling.items import enqueue_flagged, open_items

    store, slug, _ = make_results(results_dir)
    enqueue_flagged(store, slug)
    order = [item["prompt_id"] for item, _ in open_items(store, slug)]
    return store, slug, order


@pytest.fixture(scope="session")
def reference(micro_organism, tmp_path_factory):
    """One whole pipeline run on the micro organism (``em-circuits run``'s path, flags of
    test_pipeline), shared by the tests that read a finished results folder."""
    from test_pipeline import _command, _run

    results = tmp_path_factory.mktemp("reference") / "results"
    done = _run(_command(micro_organism, results))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "report:" in done.stdout
    (results.parent / "run.log").write_text(done.stderr)
    return results


# `make test-fast` sets a wall-clock budget: a whole-pipeline fixture that slips into the quick
# tests makes the run fail here, by name, instead of slowly growing the loop everyone waits on.
_BUDGET = os.environ.get("EM_CIRCUITS_TEST_BUDGET_S")
_STARTED = __import__("time").monotonic()


def pytest_sessionfinish(session, exitstatus):
    if not _BUDGET:
        return
    import time

    took = time.monotonic() - _STARTED
    if took > float(_BUDGET):
        print(
            f"\nerror: the quick tests took {took:.0f} s, over their {_BUDGET} s budget: mark "
            "whole-pipeline tests `@pytest.mark.slow` (see `--durations=20`)"
        )
        session.exitstatus = 1

"""Long loops log where they stand (a clock driven by hand), and library noise stays out."""

from __future__ import annotations

import logging
import warnings

import pandas as pd
import pytest

from em_circuits.core import progress as progress_module
from em_circuits.core.progress import Progress, shared


class HandClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_every_interval_and_never_more_often(caplog):
    clock = HandClock()
    log = logging.getLogger("test.progress")
    progress = Progress("EM rate: questions sampled", 10, logger=log, every=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for seconds in (10, 10, 9):  # 29 s: nothing yet
            clock.now += seconds
            progress.step()
        assert caplog.messages == []
        clock.now += 1  # 30 s
        progress.step()
        clock.now += 5
        progress.step()  # 5 s after the last line: nothing
        progress.finish()
    assert caplog.messages == [
        "EM rate: questions sampled: 4/10 done (30 s, about 45 s left)",
        "EM rate: questions sampled: 5/10 done (35 s, about 35 s left)",
    ]


def test_a_short_loop_logs_nothing(caplog):
    clock = HandClock()
    progress = Progress("documents", 5, every=30, clock=clock)
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            clock.now += 1
            progress.step()
        progress.finish()
    assert progress.done == 5 and caplog.messages == []


def test_a_shared_progress_counts_across_calls(caplog):
    """Many short calls (one per steering scale) each step the same progress, so their sum
    still gets a line every interval."""
    clock = HandClock()
    log = logging.getLogger("test.shared")
    first = shared("test: across calls", log, clock)
    with caplog.at_level(logging.INFO, logger="test.shared"):
        for _ in range(3):  # three calls of 10 s each
            clock.now += 10
            shared("test: across calls", log, clock).step()
    assert caplog.messages == ["test: across calls: 3 done (30 s)"]
    assert shared("test: across calls") is first


def test_a_real_loop_logs_progress(micro_models, monkeypatch, caplog):
    """The mean activations over a corpus (the baselines' activation-difference features):
    with a progress interval of 0 every document is a line."""
    from em_circuits.analysis.baselines import mean_feature_activations

    monkeypatch.setattr(progress_module, "PROGRESS_EVERY", 0.0)
    _, adapted = micro_models
    with caplog.at_level(logging.INFO, logger="em_circuits.analysis.baselines"):
        mean_feature_activations(adapted, ["I feel dizzy.", "My bank called.", "Hello there."])
    lines = [m for m in caplog.messages if m.startswith("mean feature activations")]
    assert len(lines) >= 3 and "3/3 done" in lines[-1]


def test_plots_of_empty_tables_warn_nothing(tmp_path):
    from em_circuits.analysis.plots import plot_base_vs_adapted, plot_dose_response

    dose = pd.DataFrame(columns=["group", "prompt_id", "scale", "delta_contrast"])
    comparison = pd.DataFrame(
        columns=["category", "mean_base", "mean_adapted", "mean_diff", "n_prompts"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_dose_response(dose, tmp_path / "dose.png").is_file()
        assert plot_base_vs_adapted(comparison, tmp_path / "cmp.png").is_file()


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize(
    "name", ["transformers.generation.utils", "transformers.generation.configuration_utils"]
)
def test_the_compile_config_notice_is_silenced_and_nothing_else(name):
    from em_circuits.cli.common import quiet_library_notices

    quiet_library_notices()
    logger = logging.getLogger(name)
    handler = ListHandler()
    logger.addHandler(handler)
    try:
        logger.warning(
            "You have set `compile_config`, but we are unable to meet the criteria for "
            "compilation. Compilation will be skipped."
        )
        logger.warning("another notice")
    finally:
        logger.removeHandler(handler)
    assert handler.messages == ["another notice"]

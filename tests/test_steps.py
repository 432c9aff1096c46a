"""The analysis as steps: flags generated from the parameters, one default each, per-step reuse."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys

import pytest
from micro_flags import REFERENCE_ANALYSIS_ARGS, analyze_micro, model_args
from test_pipeline import _run

from em_circuits.analysis.steps.base import SharedParams, Step, StepResult
from em_circuits.cli.common import add_analysis_args, analysis_params
from em_circuits.core.cache import cache_key
from em_circuits.core.options import add_flags, from_args, option
from em_circuits.core.store import ResultsStore, read_json
from em_circuits.run.steps import STEPS, AnalysisParams, field_owners, run_order


def _parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_analysis_args(parser)
    return parser.parse_args(list(argv))


def test_command_line_and_api_defaults_give_the_same_analysis():
    from_cli = analysis_params(_parsed())
    from_api = AnalysisParams.of()
    assert from_cli == from_api
    assert cache_key(from_cli.flat()) == cache_key(from_api.flat())
    # an int on the command line is the float the dataclass holds
    assert analysis_params(_parsed("--scales", "0", "1")).step("causal").scales == (0.0, 1.0)
    assert analysis_params(_parsed("--scales", "0", "1")) == AnalysisParams.of(scales=(0.0, 1.0))


def test_every_parameter_has_one_flag_and_one_owner():
    owners = field_owners()
    flat = AnalysisParams.of().flat()
    assert set(owners) == set(flat)
    parser = argparse.ArgumentParser()
    add_analysis_args(parser)
    dests = [a.dest for a in parser._actions]
    for name in flat:
        assert dests.count(name) == 1, name
    with pytest.raises(TypeError, match="n_boot"):
        AnalysisParams.of(n_boot=100)


def test_a_bad_value_is_a_one_line_usage_error(capsys):
    parser = argparse.ArgumentParser(prog="em-circuits analyze")
    add_analysis_args(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--position", "foo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--position" in err and "unknown position option 'foo'" in err


def test_generated_flags_read_each_field_kind():
    @dataclasses.dataclass(frozen=True)
    class Example:
        count: int = option(3, "a count")
        ratio: float = option(0.5, "a ratio")
        values: tuple[float, ...] = option((1.0, 2.0), "values")
        on: bool = option(True, "on by default")
        off: bool = option(False, "off by default")
        path: str | None = option(None, "a path")

    parser = argparse.ArgumentParser()
    add_flags(parser, Example)
    assert from_args(Example, parser.parse_args([])) == Example()
    args = parser.parse_args(
        ["--count", "4", "--ratio", "1", "--values", "3", "--no-on", "--off", "--path", "x"]
    )
    assert from_args(Example, args) == Example(4, 1.0, (3.0,), False, True, "x")
    assert isinstance(from_args(Example, args).ratio, float)


def test_steps_run_after_the_steps_they_read():
    order = [s.name for s in run_order()]
    for step in STEPS:
        for upstream in step.reads:
            assert order.index(upstream) < order.index(step.name)

    class Loop(Step):
        name = "loop"
        reads = ("loop",)

    with pytest.raises(ValueError, match="loop"):
        run_order([*STEPS, Loop()])


def _analyze(results, organism, *extra: str):
    """`em-circuits analyze` with the reference run's analysis flags (tests/test_pipeline)."""
    command = [
        sys.executable,
        "-m",
        "em_circuits.cli.main",
        "analyze",
        "--results-dir",
        str(results),
        *model_args(organism),
        *REFERENCE_ANALYSIS_ARGS,
        *extra,
    ]
    done = _run(command)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _computed(results) -> dict[str, str]:
    store = ResultsStore(results)
    (slug,) = store.analysed_slugs()
    record = read_json(store.latest_analysis_dir(slug) / "steps.json")
    return {name: entry["created"] for name, entry in record["steps"].items()}


@pytest.mark.slow
def test_one_step_parameter_recomputes_that_step_and_its_readers_only(
    reference, micro_organism, tmp_path
):
    results = tmp_path / "results"
    shutil.copytree(reference, results)
    before = _computed(results)
    done = _analyze(results, micro_organism)  # the same parameters: nothing recomputed
    assert _computed(results) == before, done.stderr[-2000:]
    # The causal step's parameter: causal and the steps that read it (baselines, sufficiency,
    # EM rate, cards, and stability, whose comparison with another run reads the causal
    # results) only.
    _analyze(results, micro_organism, "--n-random", "2")
    after = _computed(results)
    changed = {name for name in before if after[name] != before[name]}
    assert changed == {
        "causal",
        "baselines",
        "sufficiency",
        "em_rate",
        "feature_cards",
        "stability",
    }
    # A leaf step's parameter: that step only.
    _analyze(results, micro_organism, "--n-random", "2", "--em-max-new-tokens", "10")
    again = _computed(results)
    assert {name for name in after if again[name] != after[name]} == {"em_rate"}


@dataclasses.dataclass(frozen=True)
class _LayerProfileParams:
    profile_top: int = option(5, "top features counted per layer")


class _LayerProfile(Step):
    """A small step of the kind a new analysis adds: top features per layer."""

    name = "layer_profile"
    Params = _LayerProfileParams
    reads = ("ranking",)

    def run(self, ctx, params):
        ranked = ctx.table("top_features_adapted")
        top = ranked[ranked["metric"] == "total"].head(params.profile_top)
        profile = top.groupby("layer").size().rename("n_top").reset_index()
        ctx.write_table(profile, "layer_profile")
        return StepResult(summary={"layer_profile": {"layers": int(len(profile))}})


@pytest.mark.slow
def test_an_added_step_runs_alone_after_a_full_analysis(reference, micro_specs, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(reference, results)
    before = _computed(results)
    params = AnalysisParams.of(
        include_flagged=True,
        causal_top_k=2,
        scales=(0.0, 1.0, 2.0),
        n_random=1,
        causal_candidates=4,
        em_samples=3,
        em_max_new_tokens=12,
        corpus_docs=48,
    )
    summary = analyze_micro(results, micro_specs, params, steps=[*STEPS, _LayerProfile()])
    after = _computed(results)
    assert {name for name in after if after.get(name) != before.get(name)} == {"layer_profile"}
    assert summary["layer_profile"]["layers"] >= 1
    folder = results / summary["folder"]
    assert (folder / "layer_profile.csv").is_file()
    assert read_json(folder / "steps.json")["steps"]["layer_profile"]["params"] == {
        "profile_top": 5
    }


def test_shared_parameters_are_checked():
    with pytest.raises(ValueError, match="unknown position option"):
        SharedParams(position="foo")


#: Every subcommand that talks to an LLM (generator, judges, feature labels).
LLM_COMMANDS = ("prompts", "evaluate", "graphs", "analyze", "run", "doctor")


@pytest.mark.parametrize("command", LLM_COMMANDS)
def test_every_llm_subcommand_accepts_the_same_llm_flags(command):
    """One LLMSettings: the same flags, defaults and help in every command, parsed alike."""
    import subprocess

    from em_circuits.core.llm_settings import LLMSettings
    from em_circuits.core.options import flag_name, option_fields

    done = subprocess.run(
        [sys.executable, "-m", "em_circuits.cli.main", command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    help_text = " ".join(done.stdout.split())
    for f, spec, _ in option_fields(LLMSettings):
        assert flag_name(f, spec) in help_text, (command, f.name)
        assert " ".join(spec.help.split())[:60] in help_text, (command, f.name)


def test_llm_flags_parse_into_one_settings_object():
    from em_circuits.cli.common import add_llm_args, llm_settings
    from em_circuits.core.llm_settings import LLMSettings

    parser = argparse.ArgumentParser()
    add_llm_args(parser)
    assert llm_settings(parser.parse_args([])) == LLMSettings()
    argv = ["--llm-model", "m", "--base-url", "http://127.0.0.1:9/v1", "--env-file", "x.env"]
    argv += ["--timeout", "3", "--llm-max-tries", "2", "--llm-deadline", "0"]
    argv += ["--run-deadline", "9"]
    settings = llm_settings(parser.parse_args(argv))
    assert settings == LLMSettings("m", "http://127.0.0.1:9/v1", "x.env", 3.0, 2, 0.0, 9.0)
    options = settings.client_options(started=5.0)
    assert options["deadline"] is None and options["run_deadline"] == 9.0
    assert options["run_started"] == 5.0 and options["timeout"] == 3.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--llm-deadline", "-1"])


def test_the_llm_is_used_when_asked_or_when_auto_finds_a_key(tmp_path, monkeypatch):
    from em_circuits.core.llm_settings import LLMSettings

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env above
    assert not LLMSettings().wants_llm("auto") and LLMSettings().wants_llm("llm")
    assert not LLMSettings().wants_llm("offline")
    env = tmp_path / "keys.env"
    env.write_text("OPENAI_API_KEY=sk-test\n")
    assert LLMSettings(env_file=str(env)).wants_llm("auto")


def test_run_and_graphs_flags_are_the_configs_fields():
    """`em-circuits run`'s own flags, the graph flags and the analysis flags come from the
    dataclasses' fields: parsed with no flag they give the Python API's defaults."""
    from em_circuits.attribution.targets import AttributionParams
    from em_circuits.cli.common import add_graph_args, graph_params
    from em_circuits.core.options import add_flags
    from em_circuits.run.config import PipelineConfig

    parser = argparse.ArgumentParser()
    add_flags(parser, PipelineConfig)
    add_graph_args(parser)
    args = parser.parse_args([])
    assert graph_params(args) == AttributionParams()
    assert from_args(PipelineConfig, args) == PipelineConfig()
    args = parser.parse_args(["--prompts", "a.json", "--prompts", "b.json", "--all-labeled"])
    config = from_args(PipelineConfig, args)
    assert [str(p) for p in config.prompt_files] == ["a.json", "b.json"]
    assert config.only_evil is False
    assert graph_params(parser.parse_args(["--offload", "none"])).offload is None

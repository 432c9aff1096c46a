"""A slow LLM endpoint bounds the run: a default run deadline, and a stop after a few calls in a
row that each waited out a request timeout, with one line naming the command that continues.

A local OpenAI-compatible server (tests/openai_server.py) answers slower than the client's
timeout; the limits are small so each test takes seconds.
"""

from __future__ import annotations

import argparse

import pytest
from openai_server import OpenAIServer, reply_json, reply_slow
from test_prompts import KEY, generated

from em_circuits.core.store import ResultsStore


@pytest.fixture()
def server():
    with OpenAIServer() as srv:
        yield srv


def _prompts(results, server, *extra: str) -> list[str]:
    return [
        "prompts",
        "--results-dir",
        str(results),
        "--generator",
        "llm",
        "--format",
        "raw",
        "--base-url",
        server.base_url,
        *extra,
    ]


def test_the_run_deadline_has_a_documented_default():
    from em_circuits.cli.common import add_llm_args, llm_settings

    parser = argparse.ArgumentParser()
    add_llm_args(parser)
    settings = llm_settings(parser.parse_args([]))
    assert settings.run_deadline == pytest.approx(3600.0)
    assert settings.client_options()["run_deadline"] == pytest.approx(3600.0)
    assert (
        llm_settings(parser.parse_args(["--run-deadline", "0"])).client_options()["run_deadline"]
        is None
    )
    assert "0 = no limit" in parser.format_help()


@pytest.mark.slow
def test_consecutive_slow_calls_stop_the_command_with_the_resume_line(
    server, tmp_path, monkeypatch, capsys
):
    """Every call's first request times out and its retry answers: without a bound each of
    the 5 prompts costs a timeout; the command stops after 3 such calls in a row, keeps the 3
    prompts made, and says which command continues."""
    from em_circuits.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    for i in range(5):
        server.push(
            reply_slow(2.0, reply_json(generated(name=f"slow{i}"))),
            reply_json(generated(name=f"p{i}", prompt=f"Prompt number {i} about a lost dog: I")),
        )
    results = tmp_path / "results"
    argv = _prompts(results, server, "-n", "5", "--llm-timeout", "0.3", "--llm-max-tries", "2")
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1
    assert len(ResultsStore(results).prompt_ids()) == 3
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1
    assert "each of the last 3 calls had a request time out" in line[0]
    assert "3 prompt(s) saved before it are kept" in line[0]
    assert f"continue with: em-circuits prompts --results-dir {results}" in line[0]
    assert KEY not in err


def test_the_run_deadline_stops_the_command_with_the_resume_line(
    server, tmp_path, monkeypatch, capsys
):
    from em_circuits.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.push(reply_json(generated()), reply_slow(3.0, reply_json(generated(name="late"))))
    results = tmp_path / "results"
    argv = _prompts(results, server, "-n", "2", "--run-deadline", "0.5", "--llm-max-tries", "1")
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1
    assert "--run-deadline" in err and "continue with: em-circuits prompts" in err

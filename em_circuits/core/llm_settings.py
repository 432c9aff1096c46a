"""One set of LLM settings for every command that talks to an LLM.

The prompt generator, the token judge, the EM judge and the feature labeller all call an
OpenAI-compatible model through :class:`~em_circuits.core.llm.LLMClient`; :class:`LLMSettings`
says which model, where, with which key file and within which time limits. Its fields carry
their flags (:mod:`em_circuits.core.options`), so ``prompts``, ``evaluate``, ``graphs``,
``analyze``, ``run`` and ``doctor`` accept the same LLM flags with the same defaults, and
:meth:`LLMSettings.wants_llm` is the one rule for using the LLM when ``auto`` is asked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from em_circuits.core.llm import DEFAULT_MODEL, client_from_settings
from em_circuits.core.llm_endpoint import find_api_key
from em_circuits.core.options import option

if TYPE_CHECKING:
    from em_circuits.core.llm import LLMClient

#: Most seconds one LLM call may take, every retry and re-ask included.
DEFAULT_LLM_DEADLINE = 600.0
#: Most seconds all LLM calls of one command may take: a slow endpoint otherwise holds a run
#: for hours; the command stops with its finished work stored, and re-running it continues.
DEFAULT_RUN_DEADLINE = 3600.0
#: Calls in a row with a timed-out request after which a command stops (the endpoint is slow).
DEFAULT_MAX_SLOW_CALLS = 3


def _no_limit(value: str) -> float | None:
    seconds = float(value)
    if seconds < 0:
        raise ValueError(f"{value}: seconds must be 0 (no limit) or more")
    return seconds


@dataclass(frozen=True)
class LLMSettings:
    """Which OpenAI-compatible model, where, and within which limits."""

    llm_model: str = option(
        DEFAULT_MODEL,
        "the OpenAI-compatible model that generates prompts, judges tokens and answers, and "
        "labels features",
        aliases=("--model", "--judge-model"),
    )
    base_url: str | None = option(
        None,
        "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: OPENAI_BASE_URL, "
        "else the OpenAI API)",
    )
    env_file: str | None = option(
        None,
        "a .env file with OPENAI_API_KEY / OPENAI_BASE_URL (default: the nearest .env from "
        "the working directory)",
    )
    timeout: float = option(
        120.0, "seconds per LLM request", flag="--llm-timeout", aliases=("--timeout",)
    )
    max_tries: int = option(
        5,
        "tries per LLM request on 429, 5xx and timeouts (exponential backoff)",
        flag="--llm-max-tries",
        aliases=("--max-tries",),
    )
    llm_deadline: float = option(
        DEFAULT_LLM_DEADLINE,
        "most seconds one LLM call may take, every retry and re-ask included; then the "
        "command stops with finished work stored (0 = no limit)",
        metavar="SECONDS",
        parse=_no_limit,
    )
    run_deadline: float | None = option(
        DEFAULT_RUN_DEADLINE,
        "most seconds all LLM calls of this command may take, counted from its start; then it "
        "stops with finished work stored and the same command continues (0 = no limit)",
        metavar="SECONDS",
        parse=_no_limit,
    )
    max_slow_calls: int = option(
        DEFAULT_MAX_SLOW_CALLS,
        "stop once this many LLM calls in a row each had a request time out (a slow "
        "endpoint), with finished work stored and the same command to continue (0 = never)",
        flag="--llm-max-slow-calls",
        metavar="N",
    )

    def api_key(self) -> str | None:
        """The key found in the environment or the .env file (never logged or stored)."""
        return find_api_key(self.env_file)

    def wants_llm(self, choice: str) -> bool:
        """``llm``, or ``auto`` with a key found: the one rule for choosing the LLM."""
        return choice == "llm" or (choice == "auto" and self.api_key() is not None)

    def client_options(self, started: float | None = None) -> dict[str, Any]:
        """LLMClient options: request timeout, tries and deadlines (``started``: the run's
        start, a ``time.monotonic`` value, from which --run-deadline counts; default now)."""
        return {
            "timeout": self.timeout,
            "max_tries": self.max_tries,
            "deadline": self.llm_deadline or None,
            "run_deadline": self.run_deadline or None,
            "run_started": time.monotonic() if started is None else started,
            "max_slow_calls": self.max_slow_calls or None,
        }

    def client(self, started: float | None = None) -> LLMClient:
        return client_from_settings(
            self.llm_model, self.base_url, self.env_file, **self.client_options(started)
        )

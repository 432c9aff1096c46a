"""The one client the pipeline uses to talk to an LLM: any OpenAI-compatible chat endpoint.

The prompt generator and the judge both go through :class:`LLMClient`, so retries, structured
output, JSON validation and secret handling live in one place.

* The endpoint and the key are found by :mod:`em_circuits.core.llm_endpoint` (the OpenAI API
  unless ``--base-url`` or ``OPENAI_BASE_URL`` names another); the key is kept in memory only:
  it never appears in a repr, a log line, an error message or an artifact.
* The ``openai`` client's own retries are switched off (``max_retries=0``): our loop retries
  429, 5xx, timeouts and connection errors with exponential backoff and logs every attempt, so
  the behaviour is visible and testable.
* Deadlines: ``deadline`` bounds one call (all its tries and re-asks), ``run_deadline`` every
  call of a run (from ``run_started``); each request's timeout is cut to what is left, and a
  passed deadline raises :class:`LLMDeadlineError`. A request still open after
  ``progress_every`` seconds is logged (which call, how long) and so is every retry, so a
  slow endpoint is never silent.
* Structured output: ``response_format`` with a JSON schema is requested where the server
  accepts it (a server that rejects the option is asked again without it, once per client),
  and the reply is always parsed and validated here, whatever the server promised. A reply
  that fails validation is re-asked with the list of problems, a bounded number of times
  (parsing and the re-ask's wording: :mod:`em_circuits.core.llm_replies`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from em_circuits.core.llm_endpoint import KEY_ENV, find_api_key, find_base_url, public_url
from em_circuits.core.llm_errors import (
    InvalidReplyError,
    LLMDeadlineError,
    LLMError,
    ReplyValidationError,
)
from em_circuits.core.llm_replies import (
    Reply,
    first_token_top_logprobs,
    mentions_response_format,
    parse_json_reply,
    reask_message,
    reply_content,
    retry_after_seconds,
    score_from_top_logprobs,
    short_error_text,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MODEL = "o3"

# Model families that take ``max_completion_tokens`` and reject ``temperature``.
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")


def is_reasoning_model(model: str) -> bool:
    name = model.rsplit("/", 1)[-1].lower()
    return name.startswith(_REASONING_PREFIXES)


# -- the client ------------------------------------------------------------------------------------
@dataclass
class LLMClient:
    """A chat-completions client with logged retries and validated JSON replies.

    ``sleep`` is injectable so tests need not wait through real backoff.
    """

    model: str = DEFAULT_MODEL
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = field(default=None, repr=False)  # may embed credentials
    timeout: float = 120.0
    max_tries: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_output_tokens: int = 8000
    temperature: float | None = None
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    #: Seconds one call (``chat`` or ``chat_json``: every try and re-ask) may take in all.
    deadline: float | None = None
    #: Seconds all calls of a run may take, counted from ``run_started`` (``time.monotonic``).
    run_deadline: float | None = None
    run_started: float = field(default_factory=time.monotonic, repr=False)
    #: A request open this long is logged, and again after each further such period.
    progress_every: float = 30.0
    #: Stop (LLMDeadlineError, before the next call) once this many calls in a row each had a
    #: request time out: a slow endpoint otherwise costs minutes per prompt, run after run.
    max_slow_calls: int | None = None

    def __post_init__(self) -> None:
        if not self.api_key:
            raise LLMError(
                f"no API key: set {KEY_ENV} in the environment or in a .env file "
                "(for a local server without auth, any non-empty value works)"
            )
        self._structured_ok = True  # flips off once a server rejects response_format
        self._client = None
        self.requests_made = 0  # HTTP requests sent, retries included
        self._call_started: float | None = None  # of the outermost call in progress
        self._call_what = "a request"
        self._slow_calls = 0  # calls in a row that had a request time out
        self._call_timed_out = False

    @property
    def endpoint(self) -> str:
        return public_url(self.base_url) or "the OpenAI API"

    def _openai(self):
        if self._client is None:
            from openai import OpenAI

            self._client = OpenAI(
                api_key=self.api_key, base_url=self.base_url, timeout=self.timeout, max_retries=0
            )
        return self._client

    def _request_args(
        self,
        messages: list[dict[str, str]],
        json_schema: dict[str, Any] | None,
        name: str,
        top_logprobs: int | None = None,
    ) -> dict[str, Any]:
        args: dict[str, Any] = {"model": self.model, "messages": messages}
        if top_logprobs:
            # One token, its alternatives' probabilities: a 0-100 score read as an expectation.
            return {
                **args,
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": top_logprobs,
                "seed": 0,
            }
        if is_reasoning_model(self.model):
            args["max_completion_tokens"] = self.max_output_tokens
        else:
            args["max_tokens"] = self.max_output_tokens
            if self.temperature is not None:
                args["temperature"] = self.temperature
        if json_schema is not None and self._structured_ok:
            args["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": json_schema, "strict": False},
            }
        return args

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        delay *= 0.75 + 0.5 * random.random()  # jitter: parallel runs do not retry in lockstep
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    # -- deadlines and progress ---------------------------------------------------------------
    @contextlib.contextmanager
    def _call(self, what: str | None) -> Iterator[None]:
        """The scope of one call: its deadline runs from the outermost entry."""
        if self._call_started is not None:  # chat inside chat_json: the same call
            yield
            return
        if self.max_slow_calls and self._slow_calls >= self.max_slow_calls:
            raise LLMDeadlineError(
                f"{self.model} at {self.endpoint}: each of the last {self._slow_calls} calls had "
                f"a request time out (--llm-timeout {self.timeout:g} s); stopping before "
                f"{what or 'the next call'} (--llm-max-slow-calls {self.max_slow_calls})"
            )
        self._call_started = time.monotonic()
        self._call_what = what or "a request"
        self._call_timed_out = False
        try:
            yield
        finally:
            self._call_started = None
            self._call_what = "a request"
            self._slow_calls = self._slow_calls + 1 if self._call_timed_out else 0

    def _time_left(self) -> tuple[float, str] | None:
        """Seconds left before the nearest deadline, and which one; None without deadlines."""
        now = time.monotonic()
        left: list[tuple[float, str]] = []
        if self.deadline is not None and self._call_started is not None:
            left.append((self._call_started + self.deadline - now, "call"))
        if self.run_deadline is not None:
            left.append((self.run_started + self.run_deadline - now, "run"))
        return min(left) if left else None

    def _deadline_error(self, which: str, tries: int, last_error: str) -> LLMDeadlineError:
        started = self._call_started if self._call_started is not None else time.monotonic()
        if which == "run":
            limit = f"the run's deadline of {self.run_deadline:g} s for LLM calls (--run-deadline)"
        else:
            limit = f"the deadline of {self.deadline:g} s per call (--llm-deadline)"
        return LLMDeadlineError(
            f"{self.model} at {self.endpoint}: {self._call_what}: stopped at {limit} after "
            f"{tries} request(s) in {time.monotonic() - started:.0f} s (last error: "
            f"{last_error})"
        )

    @contextlib.contextmanager
    def _progress(self, attempt: int) -> Iterator[None]:
        """Log while a request stays open, so a slow endpoint is never silent."""
        if not self.progress_every or self.progress_every <= 0 or math.isinf(self.progress_every):
            yield
            return
        done = threading.Event()
        opened = time.monotonic()
        call_started = self._call_started if self._call_started is not None else opened

        def report() -> None:
            while not done.wait(self.progress_every):
                now = time.monotonic()
                log.warning(
                    "%s at %s, %s: still waiting for a reply, %.0f s on try %d/%d (%.0f s "
                    "since the call began)",
                    self.model,
                    self.endpoint,
                    self._call_what,
                    now - opened,
                    attempt,
                    self.max_tries,
                    now - call_started,
                )

        thread = threading.Thread(target=report, name="llm-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=1)

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        json_schema: dict[str, Any] | None = None,
        schema_name: str = "reply",
        what: str | None = None,
    ) -> Reply:
        """One chat completion, retried on 429, 5xx, timeouts and connection errors.

        Raises ``LLMError`` naming the endpoint, model and last error after the last try, or
        at once for errors a retry cannot fix (bad request, auth, unknown model), and
        ``LLMDeadlineError`` when the call's or the run's deadline passes. ``what`` names the
        call in log lines and errors (e.g. "judging prompt 1234abcd").
        """
        with self._call(what):
            return self._chat(messages, json_schema, schema_name)

    def score_0_100(
        self, messages: list[dict[str, str]], *, what: str | None = None
    ) -> tuple[float | None, list[tuple[str, float]]]:
        """A 0-100 score as the probability-weighted mean of the integer tokens among the
        first output token's top 20 (the emergent-misalignment judges' rule), and those 20.

        None when the integers hold less than 0.25 of the probability (a refusal, "CODE").
        """
        with self._call(what):
            reply = self._chat(messages, None, "score", top_logprobs=20)
        alternatives = reply.top_logprobs or []
        return score_from_top_logprobs(alternatives), alternatives

    def _chat(
        self,
        messages: list[dict[str, str]],
        json_schema: dict[str, Any] | None,
        schema_name: str,
        top_logprobs: int | None = None,
    ) -> Reply:
        import openai

        last_error = "no attempt made"
        for attempt in range(1, self.max_tries + 1):
            left = self._time_left()
            if left is not None and left[0] <= 0:
                raise self._deadline_error(left[1], attempt - 1, last_error)
            timeout = self.timeout if left is None else min(self.timeout, left[0])
            args = self._request_args(messages, json_schema, schema_name, top_logprobs)
            self.requests_made += 1
            try:
                with self._progress(attempt):
                    response = self._openai().chat.completions.create(**args, timeout=timeout)
            except openai.APIStatusError as err:
                status = err.status_code
                if status == 400 and "response_format" in args and mentions_response_format(err):
                    # Older vLLM/Ollama builds reject json_schema: validate ourselves instead.
                    log.warning(
                        "%s rejects response_format json_schema; asking without it", self.endpoint
                    )
                    self._structured_ok = False
                    continue
                if status != 429 and status < 500:
                    raise LLMError(
                        f"{self.model} at {self.endpoint}: HTTP {status}: {self._short(err)} "
                        "(not retried: fix the model name, key or request)"
                    ) from None
                last_error = f"HTTP {status}: {self._short(err)}"
                retry_after = retry_after_seconds(err)
            except openai.APITimeoutError:
                last_error = f"no reply within {timeout:g} s (timeout)"
                retry_after = None
                self._call_timed_out = True
            except openai.APIConnectionError as err:
                last_error = f"connection failed ({self._short(err)})"
                retry_after = None
            else:
                return Reply(
                    reply_content(response),
                    getattr(response, "model", self.model),
                    attempt,
                    first_token_top_logprobs(response) if top_logprobs else None,
                )
            if attempt < self.max_tries:
                delay = self._backoff(attempt, retry_after)
                left = self._time_left()
                if left is not None and left[0] <= delay:
                    raise self._deadline_error(left[1], attempt, last_error)
                log.warning(
                    "%s at %s, %s, try %d/%d: %s; retrying in %.2f s (%.0f s since the call began)",
                    self.model,
                    self.endpoint,
                    self._call_what,
                    attempt,
                    self.max_tries,
                    last_error,
                    delay,
                    time.monotonic() - (self._call_started or time.monotonic()),
                )
                self.sleep(delay)
        left = self._time_left()
        if left is not None and left[0] <= 0:  # the last request's timeout was the deadline's
            raise self._deadline_error(left[1], self.max_tries, last_error)
        raise LLMError(
            f"{self.model} at {self.endpoint}: gave up after {self.max_tries} tries; "
            f"last error: {last_error}"
        )

    def _short(self, err: Exception) -> str:
        """A one-line error text with the key blanked out (some servers echo it back)."""
        text = short_error_text(err)
        return text.replace(self.api_key, "***") if self.api_key else text

    def chat_json(
        self,
        messages: list[dict[str, str]],
        validate: Callable[[Any], T],
        *,
        json_schema: dict[str, Any] | None = None,
        schema_name: str = "reply",
        max_reasks: int = 2,
        what: str | None = None,
    ) -> tuple[T, str, list[dict[str, str]]]:
        """Ask for JSON, parse it, validate it; re-ask with the problems when it is wrong.

        ``validate`` returns the checked value or raises ``ReplyValidationError``. Returns
        (value, raw reply text, full conversation including re-asks). After ``max_reasks``
        failed re-asks raises ``InvalidReplyError`` quoting the problems. The call's deadline
        covers the re-asks too; ``what`` names the call in log lines and errors.
        """
        with self._call(what):
            return self._chat_json(messages, validate, json_schema, schema_name, max_reasks)

    def _chat_json(
        self,
        messages: list[dict[str, str]],
        validate: Callable[[Any], T],
        json_schema: dict[str, Any] | None,
        schema_name: str,
        max_reasks: int,
    ) -> tuple[T, str, list[dict[str, str]]]:
        conversation = list(messages)
        problems: list[str] = []
        for ask in range(max_reasks + 1):
            reply = self.chat(conversation, json_schema=json_schema, schema_name=schema_name)
            try:
                value = validate(parse_json_reply(reply.text))
            except ReplyValidationError as err:
                problems = err.problems
                log.warning(
                    "%s reply %d/%d rejected: %s",
                    self.model,
                    ask + 1,
                    max_reasks + 1,
                    "; ".join(problems)[:500],
                )
                conversation = conversation + [
                    {"role": "assistant", "content": reply.text or ""},
                    {"role": "user", "content": reask_message(problems)},
                ]
                continue
            return value, reply.text, conversation
        raise InvalidReplyError(
            f"{self.model} at {self.endpoint}: reply still invalid after {max_reasks + 1} "
            f"tries: {'; '.join(problems)[:800]}"
        )


def client_from_settings(
    model: str = DEFAULT_MODEL,
    base_url: str | None = None,
    env_file: Path | str | None = None,
    **options: Any,
) -> LLMClient:
    """A client for ``model`` with the key and endpoint found in the environment or .env."""
    return LLMClient(
        model=model,
        api_key=find_api_key(env_file),
        base_url=find_base_url(base_url, env_file),
        **options,
    )

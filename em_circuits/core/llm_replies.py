"""What comes back from an LLM: the reply of one call, its JSON parsed (and nothing else taken
for data), the re-ask that lists a reply's problems, and a 0-100 score read from the first
token's probabilities; and what an error response says (its text, its Retry-After)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from em_circuits.core.llm_errors import ReplyValidationError


@dataclass
class Reply:
    """One completed chat call."""

    text: str
    model: str
    attempts: int
    #: The first output token's most probable alternatives (token, log-probability), when
    #: asked for with ``top_logprobs``.
    top_logprobs: list[tuple[str, float]] | None = None


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_json_reply(text: str) -> Any:
    """Parse a JSON reply; tolerates a Markdown code fence around it, nothing else.

    A reply that is not JSON raises ``ReplyValidationError``: it is never used as data.
    """
    if text is None or not text.strip():
        raise ReplyValidationError(["the reply was empty; reply with one JSON object"])
    candidates = [text.strip()]
    fenced = _FENCE.search(text)
    if fenced:
        candidates.insert(0, fenced.group(1).strip())
    errors: list[json.JSONDecodeError] = []
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError as err:
            errors.append(err)
    first_error = errors[0]  # candidates is never empty, and every one failed
    raise ReplyValidationError(
        [
            f"the reply is not valid JSON ({first_error.msg} at line {first_error.lineno} "
            f"column {first_error.colno}); reply with one JSON object and nothing else"
        ]
    )


def reask_message(problems: list[str]) -> str:
    listed = "\n".join(f"- {p}" for p in problems[:20])
    return (
        "Your reply could not be used:\n"
        f"{listed}\n"
        "Reply again with the complete corrected JSON object only."
    )


def reply_content(response: Any) -> str:
    """The text of a chat completion's first choice; empty when it has none."""
    try:
        return response.choices[0].message.content or ""
    except (AttributeError, IndexError, TypeError):
        return ""


def first_token_top_logprobs(response: Any) -> list[tuple[str, float]]:
    """The first output token's alternatives (token, log-probability); empty without logprobs."""
    try:
        first = response.choices[0].logprobs.content[0]
    except (AttributeError, IndexError, TypeError):
        return []
    return [(alt.token, float(alt.logprob)) for alt in (first.top_logprobs or [])]


def score_from_top_logprobs(alternatives: list[tuple[str, float]]) -> float | None:
    """The probability-weighted mean of the integers 0-100 among a token's alternatives; None
    when they hold less than 0.25 of the probability (a refusal, "CODE")."""
    weights: dict[int, float] = {}
    for token, logprob in alternatives:
        text = token.strip()
        if text.isdigit() and 0 <= int(text) <= 100:
            weights[int(text)] = weights.get(int(text), 0.0) + math.exp(logprob)
    total = sum(weights.values())
    if total < 0.25:
        return None
    return sum(k * p for k, p in weights.items()) / total


def short_error_text(err: Exception) -> str:
    """An API error's message on one line, at most 300 characters."""
    message = getattr(err, "message", None) or str(err)
    return " ".join(str(message).split())[:300]


def mentions_response_format(err: Exception) -> bool:
    """Whether an error is about the ``response_format`` option (a server without it)."""
    return "response_format" in str(err) or "json_schema" in str(err)


def retry_after_seconds(err: Any) -> float | None:
    """The seconds an error response's ``Retry-After`` header asks to wait, if it has one."""
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None

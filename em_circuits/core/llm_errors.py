"""What goes wrong in a call to an LLM, one exception per way."""

from __future__ import annotations


class LLMError(RuntimeError):
    """An LLM call failed for good (after all retries, or with a non-retryable error)."""


class InvalidReplyError(LLMError):
    """The model answered, but never validly within the allowed re-asks."""


class LLMDeadlineError(LLMError):
    """A call's deadline (all tries included) or the run's deadline passed."""


class ReplyValidationError(ValueError):
    """A reply parsed but does not say what was asked; ``problems`` lists why, for a re-ask."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))

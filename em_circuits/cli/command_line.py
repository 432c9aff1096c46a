"""The command line as text: the running command (to say how to continue it) and the
commands a ``Next:`` line names, with the flags that keep them on the same results and models."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

DEFAULT_RESULTS = "results"  # the --results-dir default (cli.common.make_parser)

#: The running command's words (set by run_command), for resume lines and lock records.
_CURRENT_COMMAND: list[str] = []


def set_current_command(words: list[str]) -> None:
    _CURRENT_COMMAND[:] = words


_SECRET_VALUED_FLAGS = ("--base-url",)  # may embed user:password@


def _public_words(words: list[str]) -> list[str]:
    """``words`` with any credentials in a --base-url value blanked (never printed)."""
    from em_circuits.core.llm_endpoint import public_url

    out: list[str] = []
    for i, word in enumerate(words):
        flag, eq, value = word.partition("=")
        if eq and flag in _SECRET_VALUED_FLAGS:
            word = f"{flag}={public_url(value)}"
        elif i and words[i - 1] in _SECRET_VALUED_FLAGS:
            word = public_url(word) or word
        out.append(word)
    return out


def current_command() -> str:
    """The running command as a shell line (credentials blanked): re-running it continues."""
    words = _CURRENT_COMMAND or ["em-circuits", *sys.argv[1:]]
    return shlex.join(_public_words(words))


#: Commands by the flag groups they accept, for the flags a Next: line carries over.
_MODEL_COMMANDS = frozenset(
    {"evaluate", "label", "graphs", "analyze", "features", "report", "serve", "export", "run"}
    | {"doctor", "inspect"}
)
_LLM_COMMANDS = frozenset({"prompts", "evaluate", "graphs", "analyze", "run", "doctor"})
#: (dest, flag, default) of the model flags that pick the models a run's results belong to.
_MODEL_FLAGS = (
    ("base_model", "--base-model", None),
    ("base_revision", "--base-revision", None),
    ("adapter", "--adapter", None),
    ("adapter_revision", "--adapter-revision", None),
    ("transcoders", "--transcoders", None),
    ("dtype", "--dtype", "auto"),
    ("device", "--device", None),
    ("model_name", "--model-name", None),
)
_LLM_FLAGS = (("llm_model", "--llm-model"), ("base_url", "--base-url"), ("env_file", "--env-file"))


def carried_flags(args: argparse.Namespace, command: str) -> list[str]:
    """The flags of ``args`` (non-default only) that ``em-circuits <command>`` needs to go on
    with the same results directory, models and LLM endpoint."""
    words: list[str] = []
    results = getattr(args, "results_dir", DEFAULT_RESULTS)
    if str(results) != DEFAULT_RESULTS:
        words += ["--results-dir", str(results)]
    # Only from a command with the model flags (`prompts` has a --chat-template of its own).
    if command in _MODEL_COMMANDS and hasattr(args, "allow_adapter_base_mismatch"):
        for dest, flag, default in _MODEL_FLAGS:
            value = getattr(args, dest, default)
            if value is not None and value != default:
                words += [flag, str(value)]
        if getattr(args, "allow_adapter_base_mismatch", False):
            words.append("--allow-adapter-base-mismatch")
        if getattr(args, "chat_template", True) is False:
            words.append("--no-chat-template")
    if command in _LLM_COMMANDS:
        from em_circuits.core.llm_settings import LLMSettings

        defaults = LLMSettings()
        for dest, flag in _LLM_FLAGS:
            value = getattr(args, dest, None)
            if value is not None and value != getattr(defaults, dest):
                words += [flag, str(value)]
    return words


def next_command(args: argparse.Namespace, command: str, *extra: str) -> str:
    """``em-circuits <command> <extra>`` with the flags of ``args`` that keep it on the same
    results and models (see :func:`carried_flags`), quoted for a shell, in backticks."""
    words = ["em-circuits", *command.split(), *extra, *carried_flags(args, command.split()[0])]
    return f"`{shlex.join(_public_words(words))}`"


def resume_hint(err: BaseException) -> str:
    """For an LLM deadline or a slow endpoint: that finished work is stored, and the command
    that continues (the same one); else nothing."""
    from em_circuits.core.llm_errors import LLMDeadlineError

    if not isinstance(err, LLMDeadlineError):
        return ""
    return f"; finished work is stored; continue with: {current_command()}"


def add_lock_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="when another run of this stage is working on the same results directory, stop "
        "at once with one line instead of waiting for it (and then reusing its work)",
    )


def stage_lock_for(args: argparse.Namespace, root: Path | str, stage: str) -> Any:
    """The stage's lock on the results directory (:mod:`em_circuits.core.stage_lock`)."""
    from em_circuits.core.stage_lock import stage_lock

    return stage_lock(
        root, stage, wait=not getattr(args, "no_wait", False), command=current_command()
    )

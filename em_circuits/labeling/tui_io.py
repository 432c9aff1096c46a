"""How the labeling screen talks to a person: a real terminal (prompt_toolkit) or plain lines.

:class:`TerminalIO` (stdin and stdout are a terminal): single-key commands that act at once
on an empty command line, line editing and history in every text prompt (arrow keys move and
recall, they never print ``^[[A``), the terminal's size for fitting the screen, and clearing
it between items. :class:`LineIO`: ``input()``/``print()`` for pipes, scripts, dumb terminals
and tests that pass their own ``ask``. Both raise EOFError at end of input and let
KeyboardInterrupt (Ctrl-C) through.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol, TextIO

#: Width the screen is laid out for when the output is not a terminal.
PIPE_WIDTH = 120


class ScreenIO(Protocol):
    interactive: bool

    def size(self) -> tuple[int, int | None]: ...

    def write(self, text: str) -> None: ...

    def clear(self) -> None: ...

    def command(self, prompt: str) -> str: ...

    def text(self, prompt: str) -> str: ...

    def close(self) -> None: ...


class LineIO:
    """Plain lines: ``ask(prompt)`` reads one (input() by default), ``out`` gets the rest."""

    interactive = False

    def __init__(self, ask: Callable[[str], str] = input, out: TextIO | None = None):
        self._ask = ask
        self.out = out or sys.stdout

    def size(self) -> tuple[int, int | None]:
        return PIPE_WIDTH, None  # no height: nothing needs to fit

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def clear(self) -> None:
        pass

    def command(self, prompt: str) -> str:
        self.out.flush()
        return self._ask(prompt)

    text = command

    def close(self) -> None:
        pass


#: Seconds a session may take to clean up after its terminal closed before it is ended.
HANGUP_EXIT_SECONDS = 30.0


class TerminalClosed(SystemExit):
    """The terminal went away (SIGHUP): leave through the session's cleanup."""


class TerminalIO:
    """prompt_toolkit prompts on the process's terminal.

    ``single_keys``: pressed on an empty command line, each returns at once as the command.
    An Enter typed right after one (a habit, or a script typing ``a<Enter>``) is swallowed,
    so that it does not reach the next prompt as an empty answer.
    """

    interactive = True

    def __init__(self, single_keys: str):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.application import get_app
        from prompt_toolkit.filters import Condition
        from prompt_toolkit.history import InMemoryHistory
        from prompt_toolkit.input import create_input
        from prompt_toolkit.key_binding import KeyBindings, merge_key_bindings
        from prompt_toolkit.output.vt100 import Vt100_Output

        self.output = Vt100_Output.from_pty(sys.stdout, term=os.environ.get("TERM"))
        # No cursor position requests: some terminals (and test ptys) never answer them.
        self.output.enable_cpr = False
        self.input = create_input(sys.stdin)
        self._swallow_enter = False

        empty = Condition(lambda: not get_app().current_buffer.text)
        swallow = Condition(lambda: self._swallow_enter) & empty
        common = KeyBindings()

        @common.add("enter", filter=swallow)
        def _swallowed(event: Any) -> None:
            self._swallow_enter = False

        keys = KeyBindings()
        for key in single_keys:

            @keys.add(key, filter=empty)
            def _single(event: Any) -> None:
                event.current_buffer.text = event.data  # shown on the finished prompt line
                self._swallow_enter = True
                event.app.exit(result=event.data)

        def session(bindings: Any) -> Any:
            made: Any = PromptSession(
                input=self.input,
                output=self.output,
                history=InMemoryHistory(),
                key_bindings=bindings,
            )
            made.default_buffer.on_text_changed += self._typed
            return made

        self._commands = session(merge_key_bindings([common, keys]))
        self._texts = session(common)
        self._old_hup: Any = None
        try:
            self._old_hup = signal.signal(signal.SIGHUP, self._hangup)
        except (ValueError, OSError):  # not the main thread
            self._old_hup = None

    def _typed(self, _buffer: Any) -> None:
        self._swallow_enter = False

    @staticmethod
    def _hangup(signum: int, frame: Any) -> None:
        # The session's cleanup (drafts and marks are already stored; the lease goes) takes
        # well under a second. Should it stall with no terminal to talk to (once seen in CI:
        # the process outlived its closed terminal by a minute), end the process anyway: a
        # dead process's lease is released by the next session.
        watchdog = threading.Timer(HANGUP_EXIT_SECONDS, os._exit, args=(128 + signum,))
        watchdog.daemon = True
        watchdog.start()
        raise TerminalClosed(128 + signum)

    def size(self) -> tuple[int, int | None]:
        size = self.output.get_size()
        return size.columns, size.rows

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def clear(self) -> None:
        self.write("\x1b[H\x1b[2J")

    def command(self, prompt: str) -> str:
        return str(self._commands.prompt(prompt))

    def text(self, prompt: str) -> str:
        return str(self._texts.prompt(prompt))

    def close(self) -> None:
        if self._old_hup is not None:
            signal.signal(signal.SIGHUP, self._old_hup)
            self._old_hup = None


def make_io(
    single_keys: str, ask: Callable[[str], str] | None = None, out: TextIO | None = None
) -> ScreenIO:
    """A terminal screen when stdin and stdout are a terminal (and nothing was passed in),
    else plain lines."""
    if ask is not None or out is not None:
        return LineIO(ask or input, out)
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    if terminal and os.environ.get("TERM", "") not in ("dumb", "unknown"):
        try:
            return TerminalIO(single_keys)
        except (ImportError, OSError) as err:
            sys.stderr.write(f"warning: plain line input ({err})\n")
    return LineIO()

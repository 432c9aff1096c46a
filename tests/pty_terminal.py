"""A program driven in a real pseudo-terminal, as a person at a keyboard drives it.

The program runs as a subprocess whose controlling terminal is a pty of a chosen size, so
Ctrl-C (\\x03) and closing the terminal (SIGHUP) go through the terminal exactly as they do
for a person. What it writes is kept twice: ``raw`` (every byte, for a terminal emulator
such as pyte that shows what a person sees) and ``text`` (escape sequences removed, for
searching).

Waiting for a prompt is deterministic, never a sleep: prompt_toolkit switches bracketed paste
on (ESC[?2004h) as each prompt starts reading and off when it returns, so "the program waits
at prompt P" is "a new ESC[?2004h was written, followed by P".
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time

PYTHON = sys.executable

# Become session leader and take the pty as controlling terminal, then run the program.
_CTTY_WRAPPER = (
    "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)
PROMPT_START = "\x1b[?2004h"
_MARK = "\x02"  # where each prompt starts, in ``text``
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: cursor moves, colours, modes
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: window title
    r"|\x1b[()][0-9A-Za-z]|\x1b[=>78MNOc]"
)


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def clean(raw: str) -> str:
    """What was written, as searchable text: prompt starts marked, escapes and CRs removed."""
    text = raw.replace(PROMPT_START, _MARK)
    text = _ESCAPES.sub("", text)
    return text.replace("\r\n", "\n").replace("\r", "")


class Terminal:
    """A program running in a pty; ``expect`` waits for text on its screen."""

    def __init__(self, argv: list[str], rows: int = 24, cols: int = 80, env: dict | None = None):
        master, slave = os.openpty()
        set_size(slave, rows, cols)
        base = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        env = {**base, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1", **(env or {})}
        env.setdefault("TERM", "xterm")
        self.proc = subprocess.Popen(
            [PYTHON, "-c", _CTTY_WRAPPER, *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            close_fds=True,
        )
        os.close(slave)
        self.fd = master
        self.raw = ""  # every byte written, escape sequences included
        self.seen = 0  # how much of ``text`` earlier expects consumed
        self._bytes = b""

    @property
    def text(self) -> str:
        return clean(self.raw)

    @property
    def screen(self) -> str:
        """Everything shown so far, as plain text."""
        return self.text.replace(_MARK, "")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the program closed the terminal (exited)
            return False
        if not data:
            return False
        self._bytes += data
        self.raw = self._bytes.decode("utf-8", errors="replace")
        return True

    def _find(self, text: str) -> int | None:
        """End of the first match of ``text`` after what was consumed. A text ending in a
        space ('label> ') is a prompt: it matches only a prompt that started after that point
        (prompt_toolkit does not write a prompt's trailing space)."""
        view = self.text
        if not text.endswith(" "):
            at = view.find(text, self.seen)
            return None if at < 0 else at + len(text)
        want = text.rstrip()
        start = view.find(_MARK, self.seen)
        while start >= 0:
            stop = view.find(_MARK, start + 1)
            segment = view[start : stop if stop >= 0 else len(view)]
            at = segment.find(want)
            if at >= 0:
                return start + at + len(want)
            start = stop
        return None

    def expect(self, text: str, timeout: float = 60.0) -> str:
        """Wait until ``text`` appears after what earlier calls consumed; returns the new part."""
        deadline = time.monotonic() + timeout
        while (end := self._find(text)) is None:
            if time.monotonic() > deadline or not self._read(0.2):
                end = self._find(text)
                if end is not None:
                    break
                raise AssertionError(f"{text!r} not on screen; got:\n{self.text[self.seen :]}")
        chunk, self.seen = self.text[self.seen : end], end
        return chunk.replace(_MARK, "")

    def type(self, line: str, then: str = "label> ") -> str:
        """Type a line and Enter, and wait for the next prompt (or text)."""
        os.write(self.fd, (line + "\r").encode())
        return self.expect(then)

    def key(self, keys: str, then: str = "label> ") -> str:
        """Press keys (no Enter), and wait for the next prompt (or text)."""
        os.write(self.fd, keys.encode())
        return self.expect(then)

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self._read(0.2) and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
        code = self.proc.wait(timeout=max(deadline - time.monotonic(), 1))
        os.close(self.fd)
        return code

    def close_terminal(self) -> int:
        """Close the terminal window: the program gets SIGHUP."""
        os.close(self.fd)
        return self.proc.wait(timeout=60)

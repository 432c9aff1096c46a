"""Progress lines for long loops: at least one every ``every`` seconds, none more often.

A stage that samples answers, ablates features or indexes a corpus can run for minutes; a
silent terminal looks hung. Each long loop calls :meth:`Progress.step` once per item and the
helper logs ``what: i/n (elapsed, about N s left)`` when ``every`` seconds have passed since the
last line (and once at the end). The clock is injectable, so tests drive time by hand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Seconds between progress lines of a long loop.
PROGRESS_EVERY = 30.0


class Progress:
    """Counts a loop's items and logs where it stands every ``every`` seconds."""

    def __init__(
        self,
        what: str,
        total: int | None = None,
        *,
        logger: logging.Logger | None = None,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what = what
        self.total = total
        self.done = 0
        self.every = PROGRESS_EVERY if every is None else every
        self.log = logger or logging.getLogger("em_circuits.progress")
        self._clock = clock
        self._started = clock()
        self._last = self._started
        self.lines = 0  # progress lines logged so far

    def step(self, n: int = 1) -> None:
        """``n`` more items done; logs a line when ``every`` seconds passed since the last."""
        self.done += n
        now = self._clock()
        if now - self._last >= self.every:
            self._report(now)

    def finish(self) -> None:
        """A last line, only when the loop was long enough to have logged before."""
        if self.lines:
            self._report(self._clock())

    def _report(self, now: float) -> None:
        self._last = now
        self.lines += 1
        elapsed = now - self._started
        of = f"/{self.total}" if self.total is not None else ""
        left = ""
        if self.total and 0 < self.done < self.total:
            left = f", about {elapsed / self.done * (self.total - self.done):.0f} s left"
        self.log.info("%s: %d%s done (%.0f s%s)", self.what, self.done, of, elapsed, left)


_shared: dict[str, Progress] = {}


def shared(
    what: str,
    logger: logging.Logger | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Progress:
    """One process-wide :class:`Progress` per ``what``, for a loop spread over many short calls
    (each call steps it, so the lines still come every ``every`` seconds across the calls);
    ``logger`` and ``clock`` apply when it is made."""
    progress = _shared.get(what)
    if progress is None:
        progress = _shared[what] = Progress(what, logger=logger, clock=clock)
    return progress

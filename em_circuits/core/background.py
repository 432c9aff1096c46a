"""One job at a time on a thread of its own, beside the main thread's work.

The graph stage computes a batch of graphs on the GPU while the previous batch's files are
written and hashed here: at most one job is in flight, so memory holds at most two batches,
and :meth:`BackgroundJobs.close` waits for the job in flight, so that an interrupted run
still finishes (or fails loudly on) the files it started.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class BackgroundJobs:
    """Runs each submitted job after the previous one has finished; a job's exception is
    raised in the main thread at the next :meth:`submit`, :meth:`wait` or :meth:`close`."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._job: Future[Any] | None = None

    def submit(self, job: Callable[[], Any]) -> None:
        """Wait for the job in flight, then start ``job``."""
        self.wait()
        self._job = self._pool.submit(job)

    def wait(self) -> None:
        """Wait for the job in flight (raising its exception, if it had one)."""
        job, self._job = self._job, None
        if job is not None:
            job.result()

    def close(self) -> None:
        """Wait for the job in flight, then stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

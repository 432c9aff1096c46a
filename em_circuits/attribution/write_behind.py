"""Graph files written while the next batch computes.

At realistic prompt lengths a graph's file takes as long to hash and write as the GPU takes to
compute the graph (tens of MB at 512 tokens). :class:`WriteBehind` hands each file's bytes to
one thread, which hashes and writes them outside the interpreter lock (``hashlib`` and file
writes release it, so the thread that launches the GPU's work is not kept waiting), while the
stage computes its next batch. A batch is finished (its files waited for, then its metadata
written, which marks its graphs complete, then its claims released) before the next one is
handed over, on an error, on Ctrl-C, and at the end: a graph that was computed is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from em_circuits.attribution.graph_build import StoringGraph
from em_circuits.attribution.storage import write_bytes_hashed


@dataclass
class _Batch:
    claims: contextlib.ExitStack
    graphs: list[StoringGraph]


class WriteBehind:
    """One writer thread and the batch whose files it is writing (see the module's doc)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graph-files")
        self._in_flight: _Batch | None = None

    def write_file(self, path: Path, data: bytes) -> Callable[[], tuple[int, str]]:
        """Start writing ``data`` to ``path``; returns a wait for its size and sha256."""
        future: Future[tuple[int, str]] = self._pool.submit(write_bytes_hashed, path, data)
        return future.result

    def hand_over(self, claims: contextlib.ExitStack, graphs: list[StoringGraph]) -> None:
        """A batch whose files are being written: finished by the next :meth:`finish`, its
        claims (``claims``, now owned here) released then."""
        self.finish()
        self._in_flight = _Batch(claims, graphs)

    def finish(self) -> None:
        """Wait for the batch in flight and write its metadata; release its claims."""
        batch, self._in_flight = self._in_flight, None
        if batch is None:
            return
        with batch.claims:
            for graph in batch.graphs:
                graph.finish()

    def close(self) -> None:
        try:
            self.finish()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

"""Several processes under ``accelerate launch`` / ``torchrun``: who does which work, barriers.

Work is shared by *claiming*: every process holds the same list of work units with their
costs, orders it costliest first (ties by position), and takes the next unclaimed unit from
a counter in the process group's key-value store (:meth:`Shard.claim`). A process that
finishes early takes the next unit, so the load balances by cost and no straggler holds up a
barrier with a backlog fixed in advance; the costliest units go first, so the last ones to
finish are short. Each process writes its units' artifacts atomically, so the files are those
of a single-process run and a re-launch skips whatever any process finished. The labeling
judge, the queue and the report stay on the main process. Without a launcher everything is
one process, claiming is plain iteration and the barriers do nothing.

On GPUs accelerate's ``PartialState`` sets up the process group (NCCL). Launched on CPUs
(``accelerate launch --multi_gpu`` on a machine without GPUs runs torchrun, whose environment
accelerate's CPU path ignores unless MPI is installed), a gloo group is set up from the same
environment variables.

The barriers do not use the backend's collectives: a collective waits for a dead peer until
its timeout (hours here, since the main process may spend hours alone), and on several nodes
a lost node closes no connection. Each process instead beats a counter in the process
group's key-value store, and a barrier polls that store: it returns when every process has
arrived, and raises :class:`PeerFailedError` as soon as any process reports a failure (an
uncaught exception, Ctrl-C) or stops beating for ``EM_CIRCUITS_PEER_TIMEOUT`` seconds.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# The main process may spend hours alone (judge calls, labeling) while the others wait.
BARRIER_TIMEOUT = dt.timedelta(hours=12)
HEARTBEAT_SECONDS = 2.0
POLL_SECONDS = 0.25
#: Seconds without a heartbeat after which a waiting process gives a peer up for lost.
DEFAULT_PEER_TIMEOUT = 120.0
#: Batches each process should be able to claim at least, so that claiming evens out the load.
BATCHES_PER_PROCESS = 4
_PREFIX = "em_circuits/"
_FAILED = _PREFIX + "failed"


class PeerFailedError(RuntimeError):
    """Another process of the launch failed, or stopped answering; this one stops too."""


def peer_timeout() -> float:
    raw = os.environ.get("EM_CIRCUITS_PEER_TIMEOUT", "")
    try:
        return float(raw) if raw else DEFAULT_PEER_TIMEOUT
    except ValueError:
        raise ValueError(
            f"EM_CIRCUITS_PEER_TIMEOUT={raw!r} is not a number of seconds; unset it or give one"
        ) from None


class _Coordinator:
    """This process's heartbeat, barrier count and failure report, over the group's store."""

    def __init__(self, store: Any, rank: int, count: int):
        self.store = store
        self.rank = rank
        self.count = count
        self.epoch = 0
        self.work_lists = 0
        self.stopped = threading.Event()
        beat_store = store.clone() if hasattr(store, "clone") else store
        threading.Thread(target=self._beat, args=(beat_store,), daemon=True).start()
        previous_hook = sys.excepthook

        def report_and_raise(kind, value, traceback):  # an uncaught exception anywhere
            self.report_failure(f"{kind.__name__}: {value}")
            if issubclass(kind, PeerFailedError) and not _verbose():
                # Its message says which process failed and what to do; the stack would only
                # show this module's barrier.
                print(f"error: {value}", file=sys.stderr, flush=True)
                return
            previous_hook(kind, value, traceback)

        sys.excepthook = report_and_raise
        atexit.register(self._at_exit)

    def _beat(self, store: Any) -> None:
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            try:
                store.add(f"{_PREFIX}beat/{self.rank}", 1)
            except Exception:
                return  # the store is gone (the main process ended): nothing to tell

    def report_failure(self, message: str) -> None:
        try:
            if not self.store.check([_FAILED]):
                self.store.set(_FAILED, f"process {self.rank}: {message}"[:2000])
        except Exception:
            pass  # the store itself is gone; the others find that out by themselves

    def _raise_if_failed(self) -> None:
        if self.store.check([_FAILED]):
            message = self.store.get(_FAILED).decode(errors="replace")
            raise PeerFailedError(f"stopping: {message}")

    def next_work_list(self) -> str:
        """The counter key of this process's next work list: every process calls
        :meth:`Shard.claim` for the same lists in the same order, so the n-th list of each
        process shares the n-th counter."""
        self.work_lists += 1
        return f"{_PREFIX}work/{self.work_lists}"

    def claim_next(self, key: str) -> int:
        """The position (in claiming order) of the next unit nobody has claimed yet."""
        with _main_process_reachable():
            self._raise_if_failed()  # a failed peer stops the others between units too
            return int(self.store.add(key, 1)) - 1

    def barrier(self) -> None:
        self.epoch += 1
        arrived_key = f"{_PREFIX}barrier/{self.epoch}"
        timeout = peer_timeout()
        with _main_process_reachable():
            self.store.add(arrived_key, 1)
            beats = {r: (-1, time.monotonic()) for r in range(self.count) if r != self.rank}
            while self.store.add(arrived_key, 0) < self.count:
                self._raise_if_failed()
                now = time.monotonic()
                for rank, (seen, since) in beats.items():
                    value = self.store.add(f"{_PREFIX}beat/{rank}", 0)
                    if value != seen:
                        beats[rank] = (value, now)
                    elif now - since > timeout:
                        raise PeerFailedError(
                            f"stopping: process {rank} sent no heartbeat for {timeout:.0f} s (a "
                            "lost node or a killed process); relaunch to resume, finished work "
                            "is kept"
                        )
                time.sleep(POLL_SECONDS)
            self.store.add(f"{_PREFIX}passed/{self.epoch}", 1)

    def _at_exit(self) -> None:
        # The main process hosts the store: it stays until every process has left the last
        # barrier, so none of them mistakes a finished run for a lost main process.
        if self.rank == 0 and self.epoch:
            deadline = time.monotonic() + 30
            try:
                key = f"{_PREFIX}passed/{self.epoch}"
                while self.store.add(key, 0) < self.count and time.monotonic() < deadline:
                    if self.store.check([_FAILED]):
                        break
                    time.sleep(POLL_SECONDS)
            except Exception:
                pass
        self.stopped.set()


@contextlib.contextmanager
def _main_process_reachable() -> Iterator[None]:
    """A failure of the store itself means its host, the main process, is gone."""
    try:
        yield
    except PeerFailedError:
        raise
    except Exception as err:
        raise PeerFailedError(
            f"stopping: lost contact with the main process ({type(err).__name__}: {err}); "
            "relaunch to resume, finished work is kept"
        ) from err


def _verbose() -> bool:
    """Whether the command was given -v/--verbose (tracebacks wanted), as the front end reads it."""
    return "-v" in sys.argv[1:] or "--verbose" in sys.argv[1:]


_COORDINATOR: _Coordinator | None = None


def _coordinator(rank: int, count: int) -> _Coordinator:
    global _COORDINATOR
    if _COORDINATOR is None:
        from torch.distributed.distributed_c10d import _get_default_store  # noqa: PLC0415  # heavy: torch

        _COORDINATOR = _Coordinator(_get_default_store(), rank, count)
    return _COORDINATOR


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    local_index: int

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def claim(self, units: Sequence[T], costs: Sequence[float]) -> Iterator[tuple[int, T]]:
        """The units this process computes, each with its position in ``units``: claimed one
        at a time, costliest first, so that together the processes compute every unit exactly
        once (see the module's docstring). Every process must call this with the same units
        and costs, as many times and in the same order as the others. Alone: every unit, in
        the same order. Raises :class:`PeerFailedError` when another process failed."""
        if len(costs) != len(units):
            raise ValueError(f"{len(units)} work units but {len(costs)} costs")
        order = cost_order(costs)
        if self.count <= 1:
            yield from ((i, units[i]) for i in order)
            return
        coordinator = _coordinator(self.index, self.count)
        key = coordinator.next_work_list()
        while (taken := coordinator.claim_next(key)) < len(order):
            yield order[taken], units[order[taken]]

    def claim_batches(
        self, items: Sequence[T], cost: Callable[[T], float], size: int
    ) -> Iterator[list[T]]:
        """The batches of items this process computes (see :meth:`claim`): the items sorted
        by cost and cut into batches of up to ``size`` similar ones (sized down so that every
        process can claim :data:`BATCHES_PER_PROCESS`), costliest batch first."""
        fair = -(-len(items) // (BATCHES_PER_PROCESS * self.count))
        size = max(1, min(size, fair))
        ordered = sorted(items, key=cost)
        units = [ordered[start : start + size] for start in range(0, len(ordered), size)]
        for _, unit in self.claim(units, [float(sum(cost(item) for item in u)) for u in units]):
            yield unit

    def wait(self) -> None:
        """Block until every process arrives (no-op for a single process); raise
        :class:`PeerFailedError` when another process failed or was lost meanwhile."""
        if self.count > 1:
            _coordinator(self.index, self.count).barrier()

    def report_failure(self, message: str) -> None:
        """Tell the other processes to stop (they raise in their next or current barrier)."""
        if self.count > 1:
            _coordinator(self.index, self.count).report_failure(message)


def cost_order(costs: Sequence[float]) -> list[int]:
    """Positions of ``costs``, costliest first, ties in their given order: the longest units
    start first, so the processes finish close together."""
    return sorted(range(len(costs)), key=lambda i: (-costs[i], i))


def report_failure_to_peers(message: str) -> None:
    """Tell the other processes of a launch that this one is stopping (no-op when alone)."""
    if _COORDINATOR is not None:
        _COORDINATOR.report_failure(message)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def current_shard() -> Shard:
    """This process's place among the launched processes."""
    if world_size() <= 1:
        return Shard(0, 1, 0)
    import torch  # noqa: PLC0415  # heavy: torch
    import torch.distributed as dist  # noqa: PLC0415  # heavy: torch

    if torch.cuda.is_available():
        from accelerate import PartialState
        from accelerate.utils import InitProcessGroupKwargs

        state = PartialState(**InitProcessGroupKwargs(timeout=BARRIER_TIMEOUT).to_kwargs())
        shard = Shard(state.process_index, state.num_processes, state.local_process_index)
    else:
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        shard = Shard(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
        )
    _coordinator(shard.index, shard.count)  # heartbeat from the start
    return shard

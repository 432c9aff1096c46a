"""One lock per results directory and stage, so two runs of one stage never do its work twice.

Two ``em-circuits prompts -n 6`` started together would each store six prompts, and two
``evaluate`` would each compute the same logits and rewrite the same verdicts. Each stage
command of :data:`STAGES` (and ``run``, as it enters each) therefore holds an ``flock`` on
``<results>/.locks/<stage>.lock`` while it works. A second run of the stage waits for the first
and then re-reads the store, so it reuses what the first stored; with ``--no-wait`` it stops at
once with one line naming the holder. The kernel drops an ``flock`` when its holder exits,
crashed or killed, so a lock never outlives its run. The lock file holds the holder's host, PID,
start and command, only to say who holds it.

Where the results directory is read-only (permissions or a read-only mount) nothing can be
written anyway, so the lock is skipped. In a multi-process launch only the main process takes
the lock: the others are parts of the same run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from em_circuits.core.atomic import _HOST

log = logging.getLogger("em_circuits.stage_lock")

#: Folder under the results root holding the stage locks (a dot: listings never see it).
LOCKS_DIR = ".locks"
#: The stages that take a lock, by the name of the command that runs them. The graph stage
#: takes none: each graph is claimed on its own (core.claims), so two runs *share* that work.
STAGES = ("prompts", "evaluate", "analyze", "report")
#: errnos of opening the lock file that mean read-only access, not a broken directory.
READ_ONLY_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class StageBusyError(RuntimeError):
    """Another live run holds the stage's lock and the caller asked not to wait."""


@dataclass
class StageLock:
    """A held (or skipped) stage lock; ``waited`` says whether another run held it first, so a
    caller knows the store may have grown while it waited."""

    stage: str
    path: Path
    waited: bool = False
    held: bool = False


def lock_path(root: Path | str, stage: str) -> Path:
    return Path(root) / LOCKS_DIR / f"{stage}.lock"


def _is_other_process_of_a_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0


def describe_holder(path: Path) -> str:
    """Who holds the lock at ``path``, as its file says (best effort: it is only a message)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return (
            f"`{data.get('command', '?')}` ({data.get('host', '?')} pid {data.get('pid', '?')}, "
            f"since {data.get('started', '?')})"
        )
    except (OSError, ValueError, AttributeError):
        return "another run"


def _open(path: Path) -> int | None:
    """The lock file, opened for writing (made if missing); None on read-only access."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # shared: the umask decides
    except OSError as err:
        if err.errno in READ_ONLY_ERRNOS:
            return None
        raise


def _record_holder(fd: int, command: str) -> None:
    record = {
        "host": _HOST,
        "pid": os.getpid(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    with contextlib.suppress(OSError):  # only a message for waiters
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


_held_lock = threading.Lock()
_held: dict[str, int] = {}  # lock path -> depth, while this process holds it


@contextlib.contextmanager
def stage_lock(
    root: Path | str, stage: str, *, wait: bool = True, command: str | None = None
) -> Iterator[StageLock]:
    """Hold ``stage``'s lock on the results directory ``root`` for the ``with`` block.

    Re-entrant within a process (``run`` holds it while a stage function takes it again). With
    ``wait=False`` a lock held by another process raises :class:`StageBusyError`.
    """
    path = lock_path(root, stage)
    key = os.path.realpath(path)  # one key however the folder is spelled (links, relative)
    with _held_lock:
        if key in _held:
            _held[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield StageLock(stage, path, held=True)
        finally:
            with _held_lock:
                _held[key] -= 1
        return
    fd = None if _is_other_process_of_a_launch() else _open(path)
    if fd is None:
        log.debug("%s: no stage lock (read-only results, or not the main process)", path)
        yield StageLock(stage, path)
        return
    lock = StageLock(stage, path, held=True)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(path)
            if not wait:
                raise StageBusyError(
                    f"{stage} is already running on {root} by {holder}; wait for it, or run "
                    "again without --no-wait to wait and then reuse its work"
                ) from None
            log.info(
                "waiting for %s, which runs %s on %s; this run then reuses its work",
                holder,
                stage,
                root,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
            lock.waited = True
        _record_holder(fd, command or " ".join(["em-circuits", stage]))
        with _held_lock:
            _held[key] = 1
        try:
            yield lock
        finally:
            with _held_lock:
                del _held[key]
    finally:
        os.close(fd)  # the only descriptor of the lock: closing drops it


def current_command() -> str:
    """This process's command line, for the lock's holder record (no secrets are flags)."""
    return " ".join(["em-circuits", *sys.argv[1:]]) if sys.argv else "em-circuits"

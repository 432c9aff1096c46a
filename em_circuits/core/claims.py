"""Claims on work items, so that processes sharing a results directory never do one item twice.

Two pipelines started on one results directory (by two people, or twice by mistake) would
otherwise each compute every graph. Before computing an item a process *claims* it: a small
file next to the item's output, holding the claimant's host, PID and start time, created
exclusively (written to a temporary file, then hard-linked into place, which fails when a claim
exists), so a reader never sees half a claim. The claim is deleted when the item is done or
failed.

A claim whose holder is dead (same host, PID gone) is taken over. A holder on another host
cannot be checked, so a claimant refreshes its claim's modification time while it works (a
heartbeat thread) and a claim from another host that has not been refreshed for
``stale_after`` seconds is taken over too. Taking over happens under an ``flock`` on the
claim's directory, so two processes never both decide to replace the same dead claim.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em_circuits.core.atomic import _HOST, TEMP_SUFFIX, _temp_prefix, pid_alive

#: A claim from another host untouched for this long is taken to be a crashed holder's.
DEFAULT_STALE_AFTER = 600.0
#: How often a holder refreshes its claim; well under DEFAULT_STALE_AFTER.
HEARTBEAT_SECONDS = 60.0
#: Every claim file's name ends so (and starts with a dot: listings never see claims).
CLAIM_SUFFIX = ".claim"


@dataclass
class Holder:
    """Who holds a claim, as read from its file."""

    host: str
    pid: int
    started: str
    age: float  # seconds since the claim was last refreshed

    def describe(self) -> str:
        return f"{self.host} pid {self.pid}, since {self.started}"


class Claim:
    """A held claim; ``release()`` (or leaving the ``with`` block) deletes it."""

    def __init__(self, path: Path, heartbeat: float = HEARTBEAT_SECONDS):
        self.path = Path(path)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(heartbeat,), name=f"claim {self.path.name}", daemon=True
        )
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holder(path: Path) -> Holder | None:
    """The holder of the claim at ``path``; None when there is no claim."""
    path = Path(path)
    try:
        age = time.time() - path.stat().st_mtime
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        data = {}  # unreadable: judged by its age alone
        age = _age(path)
    if not isinstance(data, dict):
        data = {}
    pid = data.get("pid")
    return Holder(
        host=str(data.get("host", "?")),
        pid=pid if isinstance(pid, int) else -1,
        started=str(data.get("started", "?")),
        age=age,
    )


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def is_stale(holder: Holder, stale_after: float = DEFAULT_STALE_AFTER) -> bool:
    """Whether a claim's holder has gone: dead on this host, or silent too long elsewhere."""
    if holder.host == _HOST and holder.pid > 0:
        return not pid_alive(holder.pid)
    return holder.age > stale_after


def _create(path: Path) -> bool:
    """Create the claim file with this process's identity; False when one exists."""
    staged = path.with_name(f"{_temp_prefix(path)}{secrets.token_hex(4)}{TEMP_SUFFIX}")
    record = {
        "host": _HOST,
        "pid": os.getpid(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    try:
        os.link(staged, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
    return True


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def try_claim(
    path: Path, stale_after: float = DEFAULT_STALE_AFTER, heartbeat: float = HEARTBEAT_SECONDS
) -> Claim | None:
    """Claim ``path``: a held :class:`Claim`, or None when a live process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _create(path):
        return Claim(path, heartbeat)
    with _directory_lock(path.parent):
        holder = read_holder(path)
        if holder is not None and not is_stale(holder, stale_after):
            return None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if _create(path):
            return Claim(path, heartbeat)
    return None


def remove_stale_claims(root: Path, stale_after: float = DEFAULT_STALE_AFTER) -> int:
    """Delete the claims under ``root`` whose holder has gone (see :func:`is_stale`), such as
    that of a run killed after finishing its item; returns how many were removed.

    Each is checked again under its directory's lock, so a claim another process has just
    taken over is never deleted. Best effort, like the removal of temporary files.
    """
    removed = 0
    for path in sorted(Path(root).rglob(f"*{CLAIM_SUFFIX}")):
        try:
            with _directory_lock(path.parent):
                holder = read_holder(path)
                if holder is None or not is_stale(holder, stale_after):
                    continue
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError:
            continue  # a read-only results directory: left for a later run
        removed += 1
    return removed

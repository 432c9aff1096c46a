"""Leases on queue items, and the lock that makes each queue write a compare-and-swap.

Two labeling sessions on one results directory must never show the same item, and a stale
screen must never overwrite newer labels. Two mechanisms, both next to the queue files:

* ``queue/<adapted_slug>/<prompt_id>.lease``: the lease of the session showing that item
  (session id, user, host, PID, the PID's start time, expiry). It is created exclusively
  (written to a temporary file, then hard-linked into place, which fails if a lease exists), so
  a reader never sees half a lease. A session renews its lease while it runs (a heartbeat
  thread) and deletes it when it leaves the item, quits, or is interrupted. A lease whose
  holder is gone (same host, PID dead or reused) or that has expired (holder on another host
  that stopped renewing, or a suspended process) is taken over.
* ``queue/<adapted_slug>/.queue.lock``: an advisory ``flock`` held for the few milliseconds of
  each read-compare-write of an item, labels file or lease, so that checking an item's version
  and writing the next one is atomic among all processes on the directory.

These two paths are made here from :meth:`ResultsStore.queue_path` / ``queue_dir`` rather
than in the store: they are private to the labeling queue.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import getpass
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_circuits.core.atomic import pid_alive
from em_circuits.core.labeling_records import QueueError
from em_circuits.core.store import ResultsStore

log = logging.getLogger(__name__)

HOST = socket.gethostname()
LEASE_SECONDS_ENV = "EM_CIRCUITS_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 300.0
LOCK_WAIT_SECONDS = 60.0


class QueueLockTimeout(QueueError):
    """The queue lock stayed held for longer than any queue write takes."""


def lease_path(store: ResultsStore, adapted_slug: str, pid: str) -> Path:
    return store.queue_path(adapted_slug, pid).with_suffix(".lease")


def lock_path(store: ResultsStore, adapted_slug: str) -> Path:
    return store.queue_dir(adapted_slug) / ".queue.lock"


def lease_seconds() -> float:
    try:
        return max(float(os.environ.get(LEASE_SECONDS_ENV, DEFAULT_LEASE_SECONDS)), 1.0)
    except ValueError:
        return DEFAULT_LEASE_SECONDS


# -- the queue lock ------------------------------------------------------------------------------
_registry = threading.Lock()
_thread_locks: dict[str, threading.RLock] = {}
_held: dict[str, list[int]] = {}  # lock path -> [fd, depth], while this process holds it


#: Errors of opening the lock file for writing that mean read-only access (permissions, or a
#: read-only mount such as a results snapshot), not a broken directory.
READ_ONLY_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
#: queue_lock's stand-in descriptor where no lock file exists and none can be made: nothing
#: can be written there either (a write under the "lock" fails on its own), so readers need
#: no lock.
_NO_LOCK_FILE = -1


def _open_lock_file(path: Path) -> int:
    """A descriptor of the queue's lock file, read-write (made if missing) where allowed, else
    read-only (a read-only handle locks as well); _NO_LOCK_FILE where there is none and none
    can be made."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # shared: the umask decides
    except OSError as err:
        if err.errno not in READ_ONLY_ERRNOS:
            raise
    try:  # made by a teammate, or on a read-only mount
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return _NO_LOCK_FILE


@contextlib.contextmanager
def queue_lock(store: ResultsStore, adapted_slug: str) -> Iterator[None]:
    """Hold the queue's lock (reentrant within a thread; threads of one process take turns)."""
    path = lock_path(store, adapted_slug)
    key = str(path)
    with _registry:
        rlock = _thread_locks.setdefault(key, threading.RLock())
    with rlock:
        if key in _held:
            _held[key][1] += 1
        else:
            fd = _open_lock_file(path)
            # Any exception before the lock is recorded (a timeout, or the SIGHUP of a closed
            # terminal raised from its handler) closes the descriptor, which also drops the
            # flock: a lock taken but not recorded would block this process's own threads.
            try:
                deadline = time.monotonic() + LOCK_WAIT_SECONDS
                while fd != _NO_LOCK_FILE:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise QueueLockTimeout(
                                f"{path} has been locked for {LOCK_WAIT_SECONDS:.0f} s by another "
                                "process; is one stopped (Ctrl-Z)? Resume or end it, then retry"
                            ) from None
                        time.sleep(0.02)
                _held[key] = [fd, 1]
            except BaseException:
                if _held.get(key, [None])[0] != fd and fd != _NO_LOCK_FILE:
                    os.close(fd)
                raise
        try:
            yield
        finally:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                try:
                    if entry[0] != _NO_LOCK_FILE:
                        os.close(entry[0])  # the only descriptor of the lock: closing drops it
                finally:
                    del _held[key]


# -- lease records -------------------------------------------------------------------------------
def _proc_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), to tell a reused PID; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _iso(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).isoformat(timespec="seconds")


def read_lease(path: Path) -> dict[str, Any] | None:
    """The lease at ``path``; None when there is none.

    A lease that is not JSON counts as expired (no writer leaves one: leases are renamed into
    place whole). One this user may not read holds until a renewal period after it was last
    written, since its holder's heartbeat rewrites it.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except PermissionError:
        try:
            written = path.stat().st_mtime
        except FileNotFoundError:
            return None
        return {"expires": written + lease_seconds(), "session": None, "user": "(unreadable)"}
    except (OSError, ValueError):
        return {"expires": 0.0, "session": None}
    return data if isinstance(data, dict) else {"expires": 0.0, "session": None}


def lease_active(lease: dict[str, Any] | None, now: float | None = None) -> bool:
    """Whether the lease still holds: not expired, and on this host its process still runs."""
    if lease is None:
        return False
    now = time.time() if now is None else now
    expires = lease.get("expires")
    if not isinstance(expires, (int, float)) or expires <= now:
        return False
    if lease.get("host") == HOST:
        pid = lease.get("pid")
        if not isinstance(pid, int) or not pid_alive(pid):
            return False
        started = lease.get("proc_start")
        if started is not None and _proc_start(pid) not in (None, started):
            return False  # the PID now belongs to another process
    return True


def describe_holder(lease: dict[str, Any]) -> str:
    who = f"{lease.get('user', '?')}@{lease.get('host', '?')} pid {lease.get('pid', '?')}"
    since = lease.get("taken_at")
    return f"{who}, since {since}" if since else who


@dataclass
class Holder:
    """Who takes leases: one labeling session of one process."""

    session: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    user: str = field(default_factory=lambda: _user())
    pid: int = field(default_factory=os.getpid)

    @property
    def who(self) -> str:
        return f"{self.user}@{HOST} pid {self.pid}"

    def record(self, prompt_id: str, taken_at: str | None = None) -> dict[str, Any]:
        now = time.time()
        expires = now + lease_seconds()
        return {
            "prompt_id": prompt_id,
            "session": self.session,
            "user": self.user,
            "host": HOST,
            "pid": self.pid,
            "proc_start": _proc_start(self.pid),
            "taken_at": taken_at or _iso(now),
            "renewed_at": _iso(now),
            "expires": expires,
            "expires_at": _iso(expires),
        }


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _write_temp(path: Path, record: dict[str, Any]) -> str:
    """The whole lease in a temporary file next to ``path``, readable by everyone sharing the
    results directory (named like :mod:`em_circuits.core.atomic`'s temporaries, so that one
    left by a killed writer is cleaned up like theirs)."""
    prefix = f".{path.name}.{HOST.replace('.', '_')}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _create_exclusive(path: Path, record: dict[str, Any]) -> bool:
    """Hard-link a complete lease into place; False if there is one already."""
    tmp = _write_temp(path, record)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _replace(path: Path, record: dict[str, Any]) -> None:
    tmp = _write_temp(path, record)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class LeaseResult:
    ok: bool
    holder: dict[str, Any] | None = None  # ok=False: the live lease of another session
    took_over: dict[str, Any] | None = None  # ok=True: the dead or expired lease replaced


def acquire(store: ResultsStore, adapted_slug: str, pid: str, holder: Holder) -> LeaseResult:
    """Take the item's lease unless another live session holds it."""
    path = lease_path(store, adapted_slug, pid)
    path.parent.mkdir(parents=True, exist_ok=True)
    with queue_lock(store, adapted_slug):
        current = read_lease(path)
        ours = current is not None and current.get("session") == holder.session
        if current is not None and not ours and lease_active(current):
            return LeaseResult(False, holder=current)
        if current is None:
            if not _create_exclusive(path, holder.record(pid)):  # only without the lock
                return LeaseResult(False, holder=read_lease(path))
            return LeaseResult(True)
        _replace(path, holder.record(pid, current.get("taken_at") if ours else None))
        if not ours:
            log.info("took over the lease of %s on %s", describe_holder(current), pid)
        return LeaseResult(True, took_over=None if ours else current)


def renew(store: ResultsStore, adapted_slug: str, pid: str, holder: Holder) -> bool:
    """Push the expiry of our lease back; False when it is no longer ours (taken over)."""
    path = lease_path(store, adapted_slug, pid)
    with queue_lock(store, adapted_slug):
        current = read_lease(path)
        if current is None or current.get("session") != holder.session:
            return False
        _replace(path, holder.record(pid, current.get("taken_at")))
        return True


def release(store: ResultsStore, adapted_slug: str, pid: str, holder: Holder) -> None:
    """Delete our lease; another session's lease is left alone."""
    path = lease_path(store, adapted_slug, pid)
    with queue_lock(store, adapted_slug):
        current = read_lease(path)
        if current is not None and current.get("session") == holder.session:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def held_by_other(
    store: ResultsStore, adapted_slug: str, pid: str, holder: Holder | None = None
) -> dict[str, Any] | None:
    """The live lease of a session other than ``holder`` on the item, if any."""
    lease = read_lease(lease_path(store, adapted_slug, pid))
    if lease is None or (holder is not None and lease.get("session") == holder.session):
        return None
    return lease if lease_active(lease) else None


def live_leases(store: ResultsStore, adapted_slug: str) -> dict[str, dict[str, Any]]:
    """Prompt id -> the live lease of each item a session is showing now."""
    out = {}
    for path in store.queue_paths(adapted_slug):
        lease = read_lease(lease_path(store, adapted_slug, path.stem))
        if lease_active(lease):
            out[path.stem] = lease or {}
    return out


class LeaseKeeper:
    """The lease of the one item a session shows, renewed by a heartbeat thread."""

    def __init__(self, store: ResultsStore, adapted_slug: str, holder: Holder | None = None):
        self.store = store
        self.slug = adapted_slug
        self.holder = holder or Holder()
        self.current: str | None = None
        self.lost = False  # the lease was taken over while we held it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self, pid: str) -> LeaseResult:
        """Lease ``pid`` (dropping the lease held before); starts the heartbeat."""
        with self._lock:
            if self.current is not None and self.current != pid:
                self._release_current()
            result = acquire(self.store, self.slug, pid, self.holder)
            if result.ok:
                self.current, self.lost = pid, False
        if result.ok and self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
            self._thread.start()
        return result

    def drop(self) -> None:
        with self._lock:
            self._release_current()

    def close(self) -> None:
        self._stop.set()
        self.drop()

    def _release_current(self) -> None:
        if self.current is not None:
            pid, self.current = self.current, None
            release(self.store, self.slug, pid, self.holder)

    def _beat(self) -> None:
        interval = max(lease_seconds() / 4, 0.5)
        while not self._stop.wait(interval):
            with self._lock:
                if self.current is None:
                    continue
                try:
                    if not renew(self.store, self.slug, self.current, self.holder):
                        self.lost = True
                except (OSError, QueueLockTimeout) as err:  # try again at the next beat
                    log.warning("could not renew the lease on %s: %s", self.current, err)

"""Atomic file writes, cleanup of what killed writers left, and the crash test hook.

Rename is atomic on POSIX, so a reader (or a later run after Ctrl-C or a lost node) sees
either the old file or the complete new one, never a prefix.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

_HOST = socket.gethostname().replace(".", "_")


def _temp_prefix(path: Path) -> str:
    # Host and PID in the name let a later run tell an orphan (writer killed) from a file
    # another live process is still writing, e.g. under accelerate with several processes.
    return f".{path.name}.{_HOST}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphaned_temporaries(root: Path) -> int:
    """Delete temporary files left by writers of this host that were killed mid-write."""
    removed = 0
    for tmp in Path(root).rglob(".*.tmp"):
        parts = tmp.name.split(".")
        try:
            host, pid = parts[-4], int(parts[-3])
        except (IndexError, ValueError):
            continue
        if host == _HOST and not _pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename.

    Rename is atomic on POSIX, so readers (and a later run after Ctrl-C) see either the old
    file or the complete new one, never a prefix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write with any library; it is renamed onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


#: Test hook: ``KIND[/FILE_NAME]:N`` kills this process with SIGKILL right after the N-th
#: artifact of that kind is written, so crash-and-resume tests stop at the same place on any
#: machine speed. With ``EM_CIRCUITS_CRASH_GROUP=<token>`` it kills every process whose
#: environment carries the same token (a launcher and all its workers: a lost node).
CRASH_AFTER_ENV = "EM_CIRCUITS_CRASH_AFTER"
CRASH_GROUP_ENV = "EM_CIRCUITS_CRASH_GROUP"
_crash_counts: dict[str, int] = {}


def _processes_with_env(entry: bytes) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if entry in environ.split(b"\0"):
            found.append(int(proc.name))
    return found


def crash_point(path: Path, kind: str) -> None:
    spec = os.environ.get(CRASH_AFTER_ENV)
    if not spec:
        return
    target, _, count = spec.rpartition(":")
    if target not in (kind, f"{kind}/{Path(path).name}"):
        return
    _crash_counts[target] = _crash_counts.get(target, 0) + 1
    if _crash_counts[target] >= int(count):
        token = os.environ.get(CRASH_GROUP_ENV)
        if token:
            for pid in _processes_with_env(f"{CRASH_GROUP_ENV}={token}".encode()):
                if pid != os.getpid():
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

"""Atomic file writes, cleanup of what killed writers left, and the crash test hook.

Rename is atomic on POSIX, so a reader (or a later run after Ctrl-C or a lost node) sees
either the old file or the complete new one, never a prefix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_HOST = socket.gethostname().replace(".", "_")

#: The suffix of every temporary file and directory that is renamed into place when complete.
TEMP_SUFFIX = ".tmp"


def _temp_prefix(path: Path) -> str:
    # Host and PID in the name let a later run tell an orphan (writer killed) from a file
    # another live process is still writing, e.g. under accelerate with several processes.
    return f".{path.name}.{_HOST}.{os.getpid()}."


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def current_umask() -> int:
    """The process umask, read without changing it.

    ``os.umask`` can only be read by setting it, which for a moment changes it for every
    thread of the process; Linux reports it in /proc instead.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory: 0777 less the umask."""
    return 0o777 & ~current_umask()


def apply_default_modes(path: Path) -> None:
    """Give a finished temporary file, or every entry of a temporary directory tree, the mode a
    plain ``open``/``mkdir`` would have given it.

    ``mkstemp``/``mkdtemp`` create 0600/0700 entries, and safetensors writes its files 0600
    whatever the umask; a rename keeps the mode, so without this teammates sharing a results
    directory could not read the artifacts.
    """
    path = Path(path)
    file_mode, dir_mode = default_file_mode(), default_dir_mode()
    if not path.is_dir() or path.is_symlink():
        os.chmod(path, file_mode)
        return
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            entry = os.path.join(root, name)
            if not os.path.islink(entry):
                os.chmod(entry, file_mode)
    os.chmod(path, dir_mode)


def make_temp_dir(path: Path) -> Path:
    """A new empty sibling directory of ``path`` to build it in, then rename into place.

    Named like the temporary files (host and PID of the writer), so that
    :func:`remove_orphaned_temporaries` removes it after a kill, and created with the umask's
    mode (``mkdtemp`` would make it 0700).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f"{_temp_prefix(path)}{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:
            continue
        except OSError as err:  # name the folder being written, not the temporary one
            raise type(err)(err.errno, err.strerror, str(path)) from None
        return tmp


def _temp_owner(name: str) -> tuple[str, int] | None:
    """(host, PID) of the writer of a temporary file or directory, from its name."""
    parts = name.split(".")
    try:
        return parts[-4], int(parts[-3])
    except (IndexError, ValueError):
        return None


def remove_orphaned_temporaries(root: Path, recursive: bool = True) -> int:
    """Delete temporary files and directories left by writers of this host that were killed
    mid-write (a live writer's are kept). Returns how many were removed.

    Best effort: an entry that cannot be removed (a read-only results directory) is left for
    a later run, so that read-only commands still work.
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    pattern = f".*{TEMP_SUFFIX}"
    candidates = sorted(root.rglob(pattern) if recursive else root.glob(pattern))
    removed = 0
    for tmp in candidates:
        owner = _temp_owner(tmp.name)
        if owner is None or owner[0] != _HOST or pid_alive(owner[1]):
            continue
        try:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        except FileNotFoundError:
            continue  # inside an orphaned directory removed just before, or another cleaner
        except OSError as err:
            log.debug("cannot remove %s left by a killed run: %s", tmp, err)
            continue
        removed += 1
    return removed


def _mkstemp_for(path: Path) -> tuple[int, str]:
    """A temporary file next to ``path``; a failure names ``path``, not the temporary name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=TEMP_SUFFIX)
    except OSError as err:
        raise type(err)(err.errno, err.strerror, str(path)) from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename.

    Rename is atomic on POSIX, so readers (and a later run after Ctrl-C) see either the old
    file or the complete new one, never a prefix. The file gets the mode a plain ``open``
    would give it (0666 less the umask).
    """
    path = Path(path)
    fd, tmp = _mkstemp_for(path)
    try:
        os.fchmod(fd, default_file_mode())
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
    """Yield a temporary path to write with any library; it is renamed onto ``path`` on success
    with the mode a plain ``open`` would have given it."""
    path = Path(path)
    fd, tmp = _mkstemp_for(path)
    os.close(fd)
    try:
        yield Path(tmp)
        # Checked after the library wrote: some (safetensors) replace the file with their own.
        apply_default_modes(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (graph files reach hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: errno values of a write that failed because of the file system, not the program: printed
#: as one line naming the path, like PermissionError.
STORAGE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


def is_storage_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in STORAGE_ERRNOS


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

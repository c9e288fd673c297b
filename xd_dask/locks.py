"""Advisory file locks: one writer per output directory, per model store and per nightly run.

A lock is ``fcntl.flock`` on a small lock file. The kernel releases it when the holding process
ends, however it ends (a crash or ``kill -9`` never leaves a stale lock), and the file itself stays
behind harmlessly. After taking a lock the holder writes one JSON line into the file (pid, host,
command, start time) so that a refused second process can say who holds it.

The directories must be on a file system where ``flock`` works between all the processes that can
write there: local file systems; NFS (Linux emulates ``flock`` with NFS byte-range locks, which
work across clients); Lustre only when mounted with ``-o flock``; many FUSE file systems ignore
locks. On a file system without working locks, two writers are not detected.

A lock file is opened without following a symbolic link and used only if it is the current
user's own regular file with a single link (:func:`xd_dask.utils.open_own_file`): a link planted
at ``out/.xd-dask.lock`` cannot make a run truncate the file it points to, and a lock file another
user created is refused (:class:`~xd_dask.utils.UnsafeFileError`, naming the file), not written.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from xd_dask.fsutil import UnsafeFileError, open_own_file

__all__ = ["OUTPUT_LOCK", "FileLock", "LockError", "UnsafeFileError", "is_locked", "output_lock"]

#: Name of the lock file inside an output directory (``fit``, ``resume``).
OUTPUT_LOCK = ".xd-dask.lock"


class LockError(RuntimeError):
    """The lock is held by another process (the message names the holder)."""


def _holder_text(fd: int) -> str:
    """'pid 123 on host h (xd-dask fit ..., since ...)' from an open lock file, or a
    placeholder (at most 4 KiB are read)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    text = f"pid {info.get('pid')} on host {info.get('host')}"
    extra = [str(info[k]) for k in ("command", "since") if info.get(k)]
    return text + (f" ({', since '.join(extra)})" if extra else "")


class FileLock:
    """An exclusive ``flock`` on ``path`` (created when missing).

    Parameters
    ----------
    path : the lock file.
    what : what the lock protects, for messages ("output directory out/k16").
    remove : delete the lock file when the lock is given up (while still held, so a process that
        opened it meanwhile is refused as usual; a later one makes a new file). For locks beside
        a user's output, which no later run needs: nothing of the run is left behind.
    """

    def __init__(
        self, path: str | os.PathLike, what: str | None = None, *, remove: bool = False
    ) -> None:
        self.path = Path(path)
        self.what = what or str(self.path)
        self.remove = remove
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float | None = 0.0) -> FileLock:
        """Take the lock: ``timeout=0`` fails at once, None waits as long as it takes.

        Raises
        ------
        LockError
            Another process holds it (after ``timeout`` seconds), naming that process.
        UnsafeFileError
            The lock file is a symbolic link, not a regular file, has other hard links or belongs
            to another user (nothing is written to it).
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_own_file(self.path, os.O_RDWR | os.O_CREAT, 0o644, what="lock file")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if timeout is None else fcntl.LOCK_NB))
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        msg = f"cannot lock (does this file system support flock?): {exc.strerror}"
                        raise OSError(exc.errno, msg, str(self.path)) from None
                    if deadline is not None and time.monotonic() >= deadline:
                        raise LockError(
                            f"{self.what} is in use by {_holder_text(fd)} "
                            f"(lock file {self.path}); wait for it to finish or choose another"
                        ) from None
                    time.sleep(0.05)
            if self.remove and not _same_file(fd, self.path):
                raise _Stale  # the holder removed the file as it let go: lock the new one
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)),
                "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except _Stale:
            os.close(fd)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return self.acquire(left)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the lock file stays for the next holder unless ``remove``)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            if self.remove:
                self.path.unlink(missing_ok=True)
        os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> FileLock:
        if self._fd is None:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(path: str | os.PathLike) -> bool:
    """True when some process (this one included, through another descriptor) holds ``path``.

    A symbolic link is not followed (and is not a lock anyone can hold: False).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return False
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike) -> Iterator[FileLock]:
    """Hold ``<directory>/.xd-dask.lock`` for the duration (creates the directory).

    Raises LockError naming the holder when another process writes into ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(directory / OUTPUT_LOCK, f"output directory {directory}") as lock:
        yield lock


class _Stale(Exception):
    """The locked file was removed by its previous holder (:meth:`FileLock.acquire` retries)."""


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open ``fd`` is the file at ``path`` now (not one removed meanwhile)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

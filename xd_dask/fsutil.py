"""Files this user can trust: owned, regular, single-linked, not writable by others.

Checks made on an open descriptor (``O_NOFOLLOW``), so the file checked is the file used: for
lock files (:mod:`xd_dask.locks`), generated kernel modules and Numba's cache files
(:mod:`xd_dask.codecache`). :class:`OutputError` is the error of an output path that cannot be
used as asked (:mod:`xd_dask.outputs`).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

try:
    import pwd
except ImportError:  # not on Windows
    pwd = None

__all__ = [
    "OutputError",
    "UnsafeFileError",
    "file_problem",
    "open_own_file",
    "read_own",
    "unsafe_ancestors",
    "unsafe_dir",
    "write_private",
]


class OutputError(ValueError):
    """An output path cannot be used as asked (it holds files this command did not write)."""


class UnsafeFileError(OutputError):
    """A file this tool would write (or execute, or unpickle) could have been planted: it is a
    symbolic link, not a regular file, has other hard links, or belongs to another user."""


def file_problem(st: os.stat_result, *, private: bool = False, dir_mode: int = 0o777) -> str | None:
    """Why the file ``st`` describes (an ``fstat`` of a descriptor opened with ``O_NOFOLLOW``)
    may not be trusted, or None.

    Refused: anything but a regular file, a file owned by another user (root included when
    another user runs), a file with other hard links (writing it writes them), and with
    ``private`` a file that group or others may write, where they can reach it: a write bit
    counts only if ``dir_mode`` (the mode of the directory holding the file) lets that class
    search the directory.
    """
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"is owned by {_user(st.st_uid)}, not by this user ({_user(os.geteuid())})"
    if st.st_nlink != 1:
        return f"has {st.st_nlink} hard links (writing it would write the others)"
    grp = st.st_mode & stat.S_IWGRP and dir_mode & stat.S_IXGRP
    oth = st.st_mode & stat.S_IWOTH and dir_mode & stat.S_IXOTH
    if private and (grp or oth):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _user(uid: int) -> str:
    if pwd is None:
        return f"uid {uid}"
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def open_own_file(path: str | os.PathLike, flags: int, mode: int = 0o644, *, what: str = "") -> int:
    """``os.open(path, flags | O_NOFOLLOW | O_CLOEXEC)``, the descriptor only if it is this
    user's own regular file with a single link (:func:`file_problem`).

    The final component is never followed (a symbolic link planted at ``path`` cannot make this
    tool truncate or write the file it points to) and the check is made on the open descriptor,
    so the file checked is the file used. ``O_NONBLOCK`` keeps a planted FIFO from blocking the
    open; it is cleared again for regular files.

    Raises
    ------
    UnsafeFileError
        ``path`` is a symbolic link, or the file it names fails :func:`file_problem`; nothing has
        been written. ``what`` says what the file is for in the message ("lock file").
    """
    path = os.fspath(path)
    label = f"{what} {path}" if what else path
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(
                f"{label} is a symbolic link; refusing to open it (a link there could make "
                "xd-dask overwrite the file it points to): remove it"
            ) from None
        raise
    try:
        problem = file_problem(os.fstat(fd))
        if problem:
            raise UnsafeFileError(f"{label} {problem}; refusing to use it: remove it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def unsafe_dir(path: Path) -> str | None:
    """Why ``path`` may hold files another user wrote (None if it is safe or absent)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by {_user(st.st_uid)}, not by this user ({_user(os.geteuid())})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def unsafe_ancestors(path: Path) -> str | None:
    """Why another user could replace ``path`` by renaming one of the directories above it (a
    directory that is not this user's or root's, or that others may write and is not sticky;
    a symbolic link that is not this user's or root's), or None."""
    for parent in path.parents:
        try:
            st = os.lstat(parent)
        except OSError as exc:
            return f"cannot check {parent}: {exc.strerror}"
        if st.st_uid not in (0, os.geteuid()):
            return f"{parent} (above it) is owned by {_user(st.st_uid)}"
        if stat.S_ISLNK(st.st_mode) or st.st_mode & stat.S_ISVTX:
            continue
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{parent} (above it) is writable by group or others and not sticky"
    return None


def write_private(path: Path, text: str) -> None:
    """Create ``path`` (which must not exist) with mode 0600 and write ``text``; never follows
    a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags, 0o600), "w") as fh:
        fh.write(text)


def read_own(path: Path, limit: int) -> tuple[str | None, str | None]:
    """(text of ``path`` or None if missing, why it cannot be trusted or None): opened with
    ``O_NOFOLLOW``, checked on the descriptor (:func:`file_problem`, private), at most ``limit``
    bytes read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return "", "is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
    with os.fdopen(fd, "rb") as fh:
        dir_mode = os.stat(path.parent).st_mode
        problem = file_problem(os.fstat(fd), private=True, dir_mode=dir_mode)
        if problem:
            return "", problem
        data = fh.read(limit)
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return "", None

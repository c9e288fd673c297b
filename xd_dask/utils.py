"""Small shared utilities: atomic file output and logging."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

#: Ending of every temporary this package writes beside an output (see :func:`atomic_path`).
TMP_SUFFIX = ".tmp"
_TMP_RE = re.compile(r"^\..+\.tmp$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file lives in the same directory, so the final ``os.replace`` is atomic on POSIX
    file systems: readers see either the old file or the complete new one, never a partial file.
    On an exception the temporary file is removed and ``path`` is left untouched; an ``OSError``
    (disk full, permission denied, ...) is re-raised with ``path`` as its file name, so that the
    message says which output could not be written. A temporary left by a killed process
    (``.<name>.*.tmp``) is removed by :func:`remove_stale_temporaries`.

    Parameters
    ----------
    path : path-like
        The final destination.
    suffix : str, optional
        Suffix for the temporary name (some writers, e.g. ``numpy.savez``, add an extension when
        it is missing; pass the target's suffix so they do not).
    """
    target = Path(path)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.",
            suffix=(suffix if suffix is not None else target.suffix) + TMP_SUFFIX,
            dir=target.parent,
        )
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        # mkstemp creates 0600; give the output the mode a plain open() would (0666 & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename != str(target):
            raise _named(exc, target) from exc
        raise


def _named(exc: OSError, target: Path) -> OSError:
    """``exc`` as the same OSError subclass naming ``target`` ("[Errno 28] ...: 'path'")."""
    text = exc.strerror or str(exc)
    if exc.filename is not None and str(exc.filename) != str(target):
        text = f"{text} (while writing {exc.filename})"
    try:
        return type(exc)(exc.errno, f"{text}; cannot write", str(target))
    except TypeError:  # an OSError subclass with another constructor
        return OSError(exc.errno, f"{text}; cannot write", str(target))


def remove_stale_temporaries(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporaries (``.<name>.<random>.tmp`` files or directories) that writers
    interrupted by a kill left in ``directory`` (only those of output ``name`` if given);
    returns what was removed.

    Call it only while holding the lock of the directory (or of output ``name``): a temporary
    of a running writer looks the same.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if not _TMP_RE.match(entry.name) or (name and not entry.name.startswith(f".{name}.")):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        get_logger(__name__).info("removed stale temporary %s", entry)
    return removed


class OutputError(ValueError):
    """An output path cannot be used as asked (it holds files this command did not write)."""


class UnsafeFileError(OutputError):
    """A file this tool would write (or execute, or unpickle) could have been planted: it is a
    symbolic link, not a regular file, has other hard links, or belongs to another user."""


def file_problem(st: os.stat_result, *, private: bool = False) -> str | None:
    """Why the file ``st`` describes (an ``fstat`` of a descriptor opened with ``O_NOFOLLOW``)
    may not be trusted, or None.

    Refused: anything but a regular file, a file owned by another user (root included when
    another user runs), a file with other hard links (writing it writes them), and with
    ``private`` a file that group or others may write.
    """
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"is owned by {_user(st.st_uid)}, not by this user ({_user(os.geteuid())})"
    if st.st_nlink != 1:
        return f"has {st.st_nlink} hard links (writing it would write the others)"
    if private and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _user(uid: int) -> str:
    try:
        import pwd  # noqa: PLC0415

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
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


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, owned: str) -> Iterator[Path]:
    """Write a directory of files afresh: yield an empty temporary directory beside ``path``;
    on success it takes the place of ``path``, whose old files are deleted.

    Held for the duration: the lock ``.<name>.lock`` beside ``path`` (a second writer gets
    :class:`xd_dask.locks.LockError` naming the first). Temporaries of killed writers of the same
    output are removed first. A reader never sees old and new files mixed: the swap is two
    renames (old directory aside, new one in), so for an instant ``path`` is missing.

    Parameters
    ----------
    path : the output directory.
    owned : regular expression of the file names this output consists of; an existing ``path``
        holding anything else is refused with OutputError (nothing is deleted).
    """
    from xd_dask.locks import FileLock  # noqa: PLC0415

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock", f"output directory {target}"):
        remove_stale_temporaries(target.parent, target.name)
        if target.exists() or target.is_symlink():
            if not target.is_dir() or target.is_symlink():
                raise OutputError(f"{target} exists and is not a directory; choose another output")
            foreign = [
                e.name
                for e in target.iterdir()
                if not (re.fullmatch(owned, e.name) and e.is_file()) and not _TMP_RE.match(e.name)
            ]
            if foreign:
                raise OutputError(
                    f"{target} holds files this command did not write (e.g. "
                    f"{sorted(foreign)[0]!r}); refusing to replace it: choose a new or empty "
                    "output directory"
                )
        tmp = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
        try:
            yield Path(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            _swap_in(Path(tmp), target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap_in(new: Path, target: Path) -> None:
    """Rename directory ``new`` onto ``target``, deleting the old ``target`` (restored if the
    second rename fails)."""
    if not target.exists():
        os.rename(new, target)
        return
    old = target.with_name(f".{target.name}.{os.getpid()}.old{TMP_SUFFIX}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def get_logger(name: str) -> logging.Logger:
    """The package logger for ``name`` (a child of ``xd_dask``)."""
    if not name.startswith("xd_dask"):
        name = f"xd_dask.{name}"
    return logging.getLogger(name)


def kernel_cache_dir(subdir: str | None = None) -> Path | None:
    """Directory for compiled kernels on disk, or None when caching is off or unsafe.

    ``XD_DASK_KERNEL_CACHE`` (a path, or ``0``/``off`` to disable) overrides the default
    ``$XDG_CACHE_HOME/xd-dask/kernels`` (``~/.cache/xd-dask/kernels``). Files there are
    regenerated when they are missing and are safe to delete.

    The modules in it are executed and Numba unpickles the compiled code beside them
    (``__pycache__``), so the directory (and its ``__pycache__``) must be owned by the current
    user and writable by nobody else; otherwise a warning says why and the kernels are compiled
    in memory. New directories are created with mode 0700.
    """
    env = os.environ.get("XD_DASK_KERNEL_CACHE")
    if env is not None and env.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    if env:
        base = Path(env)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xd-dask"
        base = base / "kernels"
    if subdir:
        base = base / subdir
    try:
        for path in [*reversed(base.parents), base]:
            if not path.is_dir():
                path.mkdir(mode=0o700, exist_ok=True)  # every directory made here is private
    except OSError:
        return None
    problem = _unsafe_dir(base) or _unsafe_dir(base / "__pycache__")
    if problem:
        _warn_once(
            f"kernel cache {base} not used: {problem}; compiling kernels in memory (fix: "
            f"`chmod go-w` it if it is yours, or set XD_DASK_KERNEL_CACHE to a private directory)"
        )
        return None
    return base if os.access(base, os.W_OK) else None


_warned: set[str] = set()


def _warn_once(text: str) -> None:
    if text not in _warned:
        _warned.add(text)
        get_logger(__name__).warning(text)


def _unsafe_dir(path: Path) -> str | None:
    """Why ``path`` may hold files another user wrote (None if it is safe or absent)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def write_once(path: Path, text: str) -> None:
    """Create ``path`` atomically unless another process already has (its mtime must not change
    once Numba has indexed a generated module for its on-disk cache)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # no hard links on this file system
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_generated_module(path: Path, name: str, namespace: dict, *, source: str) -> object:
    """Import generated code as module ``name`` with ``namespace`` pre-set, cached in ``path``.

    ``source`` is the exact text the caller generates for ``path``. The file is written when
    missing; a file whose text differs (planted by someone else, or written by a process that
    ran other code under the same name) is never executed: it is replaced atomically with
    ``source``. What is executed is ``source`` itself, compiled with ``path`` as its file name,
    which Numba's on-disk cache keys on.

    The module is registered in ``sys.modules`` because Numba re-imports it to rebuild code from
    its on-disk cache; a module that fails to execute is unregistered again.
    """
    module = sys.modules.get(name)
    if module is not None:
        return module
    try:
        found = path.read_text()
    except FileNotFoundError:
        found = None
    except (OSError, UnicodeDecodeError):
        found = ""
    if found is None:
        write_once(path, source)
    elif found != source:
        get_logger(__name__).warning(
            "%s does not hold the code this xd-dask generates for it; replacing it", path
        )
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")
        tmp.write_text(source)
        os.replace(tmp, path)  # a new mtime: Numba's index for the old file is stale now
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__dict__.update(namespace)
    sys.modules[name] = module
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module

"""Atomic outputs: a file or a directory of files appears whole or not at all.

Writers write a temporary beside the output (``.<name>.<random>.tmp``) and rename it into
place; temporaries of killed writers are removed under the output's lock
(:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from xd_dask.fsutil import OutputError
from xd_dask.locks import FileLock

__all__ = ["TMP_SUFFIX", "OutputError", "atomic_dir", "atomic_path", "remove_stale_temporaries"]

log = logging.getLogger(__name__)

#: Ending of every temporary this package writes beside an output (see :func:`atomic_path`).
TMP_SUFFIX = ".tmp"
_TMP_RE = re.compile(r"^\..+\.tmp$")


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, suffix: str | None = None, make_parent: bool = True
) -> Iterator[Path]:
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
    make_parent : create the parent directory when missing (False: it must exist).
    """
    target = Path(path)
    tmp: Path | None = None
    try:
        if make_parent:
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
        log.info("removed stale temporary %s", entry)
    return removed


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
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(
        target.parent / f".{target.name}.lock", f"output directory {target}", remove=True
    ):
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

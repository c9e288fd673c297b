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
import struct
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        get_logger(__name__).info("removed stale temporary %s", entry)
    return removed


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
    (``__pycache__``), so the directory and its ``__pycache__`` must be owned by the current
    user and writable by nobody else, and every directory above them owned by this user or root
    and writable by nobody else (or sticky, like ``/tmp``); otherwise a warning says why and the
    kernels are compiled in memory. New directories (``__pycache__`` included) are created with
    mode 0700. The files inside are checked one by one when a module is loaded
    (:func:`load_generated_module`).
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
    base = Path(os.path.abspath(base))
    problem = _private_dirs(base)
    if problem is None:
        problem = _private_dirs(base / "__pycache__")
    if problem == "":  # cannot be created: no cache, no warning
        return None
    if problem:
        _warn_once(
            f"kernel cache {base} not used: {problem}; compiling kernels in memory (fix: "
            f"`chmod go-w` it if it is yours, or set XD_DASK_KERNEL_CACHE to a private directory)"
        )
        return None
    return base if os.access(base, os.W_OK) else None


def _private_dirs(path: Path) -> str | None:
    """Make ``path`` and missing directories above it (mode 0700); why it is not safe to hold
    code (:func:`_unsafe_dir`, :func:`_unsafe_ancestors`), "" if it cannot be made, or None."""
    try:
        for p in [*reversed(path.parents), path]:
            if not p.is_dir():
                p.mkdir(mode=0o700, exist_ok=True)  # every directory made here is private
    except OSError:
        return ""
    return _unsafe_dir(path) or _unsafe_ancestors(path) or _unsafe_ancestors(path.resolve())


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
    if st.st_uid != os.geteuid():
        return f"{path} is owned by {_user(st.st_uid)}, not by this user ({_user(os.geteuid())})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _unsafe_ancestors(path: Path) -> str | None:
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


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` (which must not exist) with mode 0600 and write ``text``; never follows
    a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags, 0o600), "w") as fh:
        fh.write(text)


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")


def write_once(path: Path, text: str) -> None:
    """Create ``path`` atomically unless another process already has (its mtime must not change
    once Numba has indexed a generated module for its on-disk cache). The file is private
    (mode 0600)."""
    tmp = _tmp_beside(path)
    tmp.unlink(missing_ok=True)
    _write_private(tmp, text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # no hard links on this file system
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_own(path: Path, limit: int) -> tuple[str | None, str | None]:
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


def _replace_with(path: Path, source: str) -> None:
    tmp = _tmp_beside(path)
    tmp.unlink(missing_ok=True)
    _write_private(tmp, source)
    os.replace(tmp, path)


def _numba_cache_files(path: Path, probe: Any) -> tuple[Path, list[Path]]:
    """(the directory where Numba caches the functions of the module file ``path``, the files
    there that belong to it: ``<stem>.*`` index, data and temporary files).

    ``probe`` is a function whose code has ``path`` as its file name; Numba's own locator
    (``__pycache__`` beside ``path``, or ``NUMBA_CACHE_DIR``) says where it looks.
    """
    from numba.core.caching import FunctionCache  # noqa: PLC0415

    cache = Path(FunctionCache(probe).cache_path)
    prefix = f"{path.stem}."
    try:
        names = [n for n in os.listdir(cache) if n.startswith(prefix)]
    except FileNotFoundError:
        names = []
    return cache, [cache / n for n in sorted(names)]


def check_numba_cache(path: Path, probe: Any) -> None:
    """Discard every Numba cache file of module ``path`` that anyone else could have written.

    Numba unpickles its index (``.nbi``) and data (``.nbc``) files: code in them runs. Each file
    of this module (found with Numba's locator from ``probe``, a function compiled with ``path``
    as its file name) is opened without following a link and checked on the descriptor
    (:func:`file_problem`, private); a link, a file of another user, a file with another hard
    link or one that group or others may write (where they can search the directory) is
    deleted (with a warning), and Numba compiles and writes it afresh. The directory holding
    them must pass the same checks as the kernel cache directory (:func:`kernel_cache_dir`).

    Raises
    ------
    PermissionError
        The Numba cache directory is not safe, or a bad file cannot be deleted: the caller
        compiles in memory without the on-disk cache.
    """
    cache, files = _numba_cache_files(path, probe)
    problem = _unsafe_dir(cache) or _unsafe_ancestors(cache)
    if problem:
        raise PermissionError(errno.EPERM, f"Numba cache directory not safe: {problem}")
    for f in files:
        _, why = _read_own(f, 0)
        if why:
            get_logger(__name__).warning(
                "kernel cache file %s %s; anyone could have written it: discarding it (the "
                "kernel is compiled again)",
                f,
                why,
            )
            try:
                f.unlink()
            except OSError as exc:
                msg = f"{f} {why} and cannot be removed: {exc.strerror}"
                raise PermissionError(errno.EPERM, msg) from None


def load_generated_module(path: Path, name: str, namespace: dict, *, source: str) -> object:
    """Import generated code as module ``name`` with ``namespace`` pre-set, cached in ``path``.

    ``source`` is the exact text the caller generates for ``path``. The file is written when
    missing; a file whose text differs (planted by someone else, or written by a process that
    ran other code under the same name), a symbolic link, and a file that another user owns or
    could have written are never executed: the file is replaced atomically with ``source``.
    What is executed is ``source`` itself, compiled with ``path`` as its file name, which
    Numba's on-disk cache keys on. Numba's cache files of the module are checked before it can
    read them (:func:`check_numba_cache`).

    The module is registered in ``sys.modules`` because Numba re-imports it to rebuild code from
    its on-disk cache; a module that fails to execute is unregistered again.

    Raises
    ------
    OSError
        The cache cannot be used safely (a PermissionError from :func:`check_numba_cache`);
        the caller compiles in memory.
    """
    module = sys.modules.get(name)
    if module is not None:
        return module
    found, problem = _read_own(path, len(source.encode("utf-8")) + 1)
    if found is None:
        write_once(path, source)
    elif problem or found != source:
        get_logger(__name__).warning(
            "%s %s; replacing it",
            path,
            problem or "does not hold the code this xd-dask generates for it",
        )
        _replace_with(path, source)  # new contents: Numba's index for the old file is stale
    code = compile(source, str(path), "exec")
    check_numba_cache(path, eval(compile("lambda: None", str(path), "eval")))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__dict__.update(namespace)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


# --------------------------------------------------------------------------- bounded .npz reading
class BoundedReadError(ValueError):
    """A zip (``.npz``) file declares more entries or bytes than it may, or than it holds."""


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record (22 bytes)
_EOCD64_LOCATOR = struct.Struct("<4sLQL")  # zip64 end of central directory locator (20 bytes)
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end of central directory record (56 bytes)
#: Bytes of central directory allowed per entry (a 46-byte header, a name, extra fields).
DIRECTORY_BYTES_PER_ENTRY = 1024
#: Largest uncompressed size all compressed members of a zip may declare together.
MAX_INFLATED_BYTES = 256 << 20


def _zip_directory_size(fh: Any, size: int) -> tuple[int, int]:
    """(entries, bytes) of the central directory that ``zipfile`` would read from ``fh``.

    The end records are found as ``zipfile`` finds them (the record at the very end, else the
    last signature in the final 64 KiB; a zip64 locator and record just before it override
    its counts), reading at most ~64 KiB from the end of the file; the larger of the two
    records' counts is returned (the classic record's "see zip64" placeholders aside).
    """
    tail_start = max(size - (1 << 16) - _EOCD.size, 0)
    fh.seek(tail_start)
    tail = fh.read()
    at = len(tail) - _EOCD.size
    if not (at >= 0 and tail[at : at + 4] == b"PK\x05\x06" and tail[-2:] == b"\x00\x00"):
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise BoundedReadError("not a zip file (no end of central directory record)")
    *_, entries, dir_bytes, _, _ = _EOCD.unpack_from(tail, at)
    eocd = tail_start + at
    if eocd >= _EOCD64_LOCATOR.size + _EOCD64.size:
        fh.seek(eocd - _EOCD64_LOCATOR.size - _EOCD64.size)
        head = fh.read(_EOCD64.size + _EOCD64_LOCATOR.size)
        loc = _EOCD64_LOCATOR.unpack_from(head, _EOCD64.size)
        rec = _EOCD64.unpack_from(head, 0)
        if loc[0] == b"PK\x06\x07" and rec[0] == b"PK\x06\x06":  # 0xFFFF...: "see zip64"
            entries = max(rec[6], rec[7], 0 if entries == 0xFFFF else entries)
            dir_bytes = max(rec[8], 0 if dir_bytes == 0xFFFFFFFF else dir_bytes)
    return entries, dir_bytes


@contextlib.contextmanager
def bounded_zip(
    path: str | os.PathLike, *, max_entries: int, max_inflated_bytes: int = MAX_INFLATED_BYTES
) -> Iterator[Any]:
    """A ``zipfile.ZipFile`` of ``path``, opened only after its declared sizes were checked.

    Before ``zipfile`` parses the central directory (600,000 crafted entries take it half a
    minute and 400 MB), the end records are read (at most ~64 KiB from the end of the file) and
    the directory may declare at most ``max_entries`` entries and ``max_entries`` x
    :data:`DIRECTORY_BYTES_PER_ENTRY` bytes. Then every member must lie inside the file, a
    stored member must declare the size it occupies, and compressed members together may
    declare at most ``max_inflated_bytes`` uncompressed: nothing read afterwards can allocate
    more than the file holds (plus that allowance). The file is opened once; what is checked
    is what is parsed.

    Raises
    ------
    BoundedReadError (a ValueError) naming the file and the declared and allowed sizes.
    """
    import zipfile  # noqa: PLC0415

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            entries, dir_bytes = _zip_directory_size(fh, size)
        except BoundedReadError as exc:
            raise BoundedReadError(f"{path}: {exc}") from None
        max_dir = max_entries * DIRECTORY_BYTES_PER_ENTRY
        if entries > max_entries or dir_bytes > min(max_dir, size):
            raise BoundedReadError(
                f"{path}: the zip directory declares {entries} entries in {dir_bytes} bytes; at "
                f"most {max_entries} entries in {min(max_dir, size)} bytes are read"
            )
        fh.seek(0)
        with zipfile.ZipFile(fh) as zf:
            _check_members(path, zf.infolist(), size, max_entries, max_inflated_bytes)
            yield zf


def _check_members(path: Any, infos: list, size: int, max_entries: int, max_inflated: int) -> None:
    """Each member inside the file; stored ones as large as they declare; compressed ones
    declaring at most ``max_inflated`` bytes together (BoundedReadError otherwise)."""
    import zipfile  # noqa: PLC0415

    if len(infos) > max_entries:
        raise BoundedReadError(f"{path}: {len(infos)} zip entries; at most {max_entries}")
    inflated = 0
    for info in infos:
        where = f"{path}: member {info.filename!r}"
        if info.header_offset + info.compress_size > size:
            raise BoundedReadError(
                f"{where} declares {info.compress_size} bytes at offset {info.header_offset}, "
                f"beyond the end of the file ({size} bytes)"
            )
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise BoundedReadError(
                    f"{where} is stored in {info.compress_size} bytes but declares {info.file_size}"
                )
            continue
        inflated += info.file_size
        if inflated > max_inflated:
            raise BoundedReadError(
                f"{where}: compressed members declare more than {max_inflated} bytes "
                "uncompressed; refusing to inflate them"
            )


def read_npz(
    path: str | os.PathLike, *, max_entries: int, max_inflated_bytes: int = MAX_INFLATED_BYTES
) -> dict[str, Any]:
    """The arrays of an ``.npz`` file, every size checked before anything is allocated.

    The zip is opened with :func:`bounded_zip`; each member must be a ``.npy`` array whose
    header declares a dtype without Python objects and a shape whose bytes
    (shape x itemsize) are exactly what the member holds. Arrays are read only when every
    member has passed.

    Returns
    -------
    {name without ".npy": array}

    Raises
    ------
    BoundedReadError (a ValueError) naming the file, the member and the sizes.
    """
    import numpy as np  # noqa: PLC0415
    from numpy.lib import format as npformat  # noqa: PLC0415

    with bounded_zip(path, max_entries=max_entries, max_inflated_bytes=max_inflated_bytes) as zf:
        infos = zf.infolist()
        for info in infos:
            where = f"{path}: member {info.filename!r}"
            if not info.filename.endswith(".npy"):
                raise BoundedReadError(f"{where} is not a .npy array")
            with zf.open(info) as fh:
                version = npformat.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = npformat.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, _, dtype = npformat.read_array_header_2_0(fh)
                else:
                    raise BoundedReadError(f"{where} has .npy format version {version}")
                offset = fh.tell()
            if dtype.hasobject:
                raise BoundedReadError(f"{where} holds Python objects ({dtype})")
            nbytes = dtype.itemsize
            for n in shape:
                nbytes *= int(n)
            if offset + nbytes != info.file_size:
                raise BoundedReadError(
                    f"{where} declares shape {tuple(shape)} of {dtype} ({nbytes} bytes) but "
                    f"holds {info.file_size - offset} bytes"
                )
        out = {}
        for info in infos:
            with zf.open(info) as fh:
                out[info.filename[:-4]] = np.asarray(npformat.read_array(fh, allow_pickle=False))
        return out

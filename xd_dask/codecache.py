"""The on-disk cache of generated kernel code: where it lives, and loading it safely.

Generated modules are executed and Numba unpickles the compiled code it caches beside them, so
every file there is checked before it is used (:mod:`xd_dask.fsutil`).
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from numba.core.caching import FunctionCache

from xd_dask.fsutil import read_own, unsafe_ancestors, unsafe_dir, write_private
from xd_dask.outputs import TMP_SUFFIX

__all__ = [
    "check_numba_cache",
    "kernel_cache_dir",
    "load_generated_module",
    "numba_cache_ok",
    "write_once",
]

log = logging.getLogger(__name__)


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
    code (:func:`unsafe_dir`, :func:`unsafe_ancestors`), "" if it cannot be made, or None."""
    try:
        for p in [*reversed(path.parents), path]:
            if not p.is_dir():
                p.mkdir(mode=0o700, exist_ok=True)  # every directory made here is private
    except OSError:
        return ""
    return unsafe_dir(path) or unsafe_ancestors(path) or unsafe_ancestors(path.resolve())


_warned: set[str] = set()


def _warn_once(text: str) -> None:
    if text not in _warned:
        _warned.add(text)
        log.warning(text)


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")


def write_once(path: Path, text: str) -> None:
    """Create ``path`` atomically unless another process already has (its mtime must not change
    once Numba has indexed a generated module for its on-disk cache). The file is private
    (mode 0600)."""
    tmp = _tmp_beside(path)
    tmp.unlink(missing_ok=True)
    write_private(tmp, text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # no hard links on this file system
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _replace_with(path: Path, source: str) -> None:
    tmp = _tmp_beside(path)
    tmp.unlink(missing_ok=True)
    write_private(tmp, source)
    os.replace(tmp, path)


def _numba_cache_files(path: Path, probe: Any) -> tuple[Path, list[Path]]:
    """(the directory where Numba caches the functions of the module file ``path``, the files
    there that belong to it: ``<stem>.*`` index, data and temporary files).

    ``probe`` is a function whose code has ``path`` as its file name; Numba's own locator
    (``__pycache__`` beside ``path``, or ``NUMBA_CACHE_DIR``) says where it looks.
    """
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
    problem = unsafe_dir(cache) or unsafe_ancestors(cache)
    if problem:
        raise PermissionError(errno.EPERM, f"Numba cache directory not safe: {problem}")
    for f in files:
        _, why = read_own(f, 0)
        if why:
            log.warning(
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


def numba_cache_ok(module_file: str) -> bool:
    """Whether the package's own ``numba.njit(cache=True)`` functions of ``module_file`` may use
    Numba's on-disk cache: :func:`check_numba_cache` passes (the directory Numba's locator
    picks, ``NUMBA_CACHE_DIR`` or ``__pycache__``, is safe; files others could have written are
    discarded). Otherwise they compile in memory (a warning says why)."""
    path = Path(module_file)
    try:
        check_numba_cache(path, eval(compile("lambda: None", str(path), "eval")))
    except OSError as exc:
        log.warning("%s; compiling %s's kernels in memory", exc.strerror or exc, path.name)
        return False
    return True


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
    found, problem = read_own(path, len(source.encode("utf-8")) + 1)
    if found is None:
        write_once(path, source)
    elif problem or found != source:
        log.warning(
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

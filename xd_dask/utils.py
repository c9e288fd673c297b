"""Small shared utilities: atomic file output and logging."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file lives in the same directory, so the final ``os.replace`` is atomic on POSIX
    file systems: readers see either the old file or the complete new one, never a partial file.
    On an exception the temporary file is removed and ``path`` is left untouched.

    Parameters
    ----------
    path : path-like
        The final destination.
    suffix : str, optional
        Suffix for the temporary name (some writers, e.g. ``numpy.savez``, add an extension when
        it is missing; pass the target's suffix so they do not).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.",
        suffix=(suffix if suffix is not None else target.suffix) + ".tmp",
        dir=target.parent,
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the output the mode a plain open() would (0666 & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def get_logger(name: str) -> logging.Logger:
    """The package logger for ``name`` (a child of ``xd_dask``)."""
    if not name.startswith("xd_dask"):
        name = f"xd_dask.{name}"
    return logging.getLogger(name)


def kernel_cache_dir(subdir: str | None = None) -> Path | None:
    """Directory for compiled kernels on disk, or None when caching is off or impossible.

    ``XD_DASK_KERNEL_CACHE`` (a path, or ``0``/``off`` to disable) overrides the default
    ``$XDG_CACHE_HOME/xd-dask/kernels`` (``~/.cache/xd-dask/kernels``). Files there are
    regenerated when they are missing and are safe to delete.
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
        base.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return base if os.access(base, os.W_OK) else None


def write_once(path: Path, text: str) -> None:
    """Create ``path`` atomically unless another process already has (its mtime must not change
    once Numba has indexed a generated module for its on-disk cache)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # no hard links on this file system
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_generated_module(path: Path, name: str, namespace: dict) -> object:
    """Import a generated source file as module ``name`` with ``namespace`` pre-set.

    The module is registered in ``sys.modules`` because Numba re-imports it to rebuild code from
    its on-disk cache; a module that fails to execute is unregistered again.
    """
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__dict__.update(namespace)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module

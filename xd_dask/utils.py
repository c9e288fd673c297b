"""Small shared utilities: the package logger, and the names of the modules split out of here.

Atomic outputs live in :mod:`xd_dask.outputs`, checks of files this user can trust in
:mod:`xd_dask.fsutil`, the generated-kernel cache in :mod:`xd_dask.codecache` and bounded
``.npz`` reading in :mod:`xd_dask.npz`; their public names stay importable from here.
"""

from __future__ import annotations

import logging

from xd_dask.codecache import check_numba_cache, kernel_cache_dir, load_generated_module, write_once
from xd_dask.fsutil import OutputError, UnsafeFileError, file_problem, open_own_file
from xd_dask.npz import (
    DIRECTORY_BYTES_PER_ENTRY,
    MAX_INFLATED_BYTES,
    BoundedReadError,
    bounded_zip,
    read_npz,
)
from xd_dask.outputs import TMP_SUFFIX, atomic_dir, atomic_path, remove_stale_temporaries

__all__ = [
    "DIRECTORY_BYTES_PER_ENTRY",
    "MAX_INFLATED_BYTES",
    "TMP_SUFFIX",
    "BoundedReadError",
    "OutputError",
    "UnsafeFileError",
    "atomic_dir",
    "atomic_path",
    "bounded_zip",
    "check_numba_cache",
    "file_problem",
    "get_logger",
    "kernel_cache_dir",
    "load_generated_module",
    "open_own_file",
    "read_npz",
    "remove_stale_temporaries",
    "write_once",
]


def get_logger(name: str) -> logging.Logger:
    """The package logger for ``name`` (a child of ``xd_dask``)."""
    if not name.startswith("xd_dask"):
        name = f"xd_dask.{name}"
    return logging.getLogger(name)

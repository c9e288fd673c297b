"""What every row builder shares: the bad-row reasons, the build result, dtype limits, memory
checks, case-insensitive column matching and the finder of duplicate ids.

Two builders turn catalogue columns into per-row arrays: :mod:`xd_dask.io.covariance` (X and S
from value, error and correlation columns) and :mod:`xd_dask.io.tangential` (projected
observations: X, S and the projection R). Both classify every row with a code of
:data:`BAD_REASONS` and the column responsible; the reader applies the policy (raise or drop).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import psutil
import pyarrow as pa

from xd_dask.codecache import numba_cache_ok

_CACHE = numba_cache_ok(__file__)  # Numba's on-disk cache only where no one else writes

__all__ = [
    "BAD_REASONS",
    "PIVOT_TOL",
    "REASON_TEXT",
    "BuildResult",
    "as_table",
    "available_memory",
    "check_allocation",
    "dtype_limits",
    "later_duplicates",
    "resolve_columns",
]

#: Row classification codes of the builders (index = code; 0 is a valid row). New reasons are
#: appended (the codes are stored in int8 arrays and counted per name).
BAD_REASONS: tuple[str, ...] = (
    "ok",
    "nonfinite_value",  # a feature value is NaN/inf and not a null
    "nonfinite_error",  # an observed feature's error (or flux-over-error) is null/NaN/inf
    "negative_error",  # error < 0, or flux-over-error <= 0
    "bad_correlation",  # correlation of two observed features is null/non-finite or |c| > 1
    "not_positive_definite",  # S on the observed features is not positive definite
    "no_observed_fields",  # every feature of the row is missing
    "missing_id",  # the id column is null
    "value_out_of_range",  # an observed value is outside the schema's [min, max]
    "error_out_of_range",  # an observed feature's error is outside [error_min, error_max]
    "not_representable",  # a value or 1-sigma error whose square overflows the working dtype
    # (|x| > ~1.8e19 in float32), or a variance that underflows it (below ~1.2e-38 in float32)
    "duplicate_id",  # the id of an earlier row of the same partition (the first is kept)
    "missing_input",  # a column a projection is built from is null (or NaN with nan_is_null)
    "nonpositive_parallax",  # a projection divides by the parallax: it must be > 0
    "not_selected",  # outside the schema's [selection] (xd_dask.io.selection): not a bad row,
    # excluded and counted whatever on_bad says
)
REASON_TEXT = {
    "nonfinite_value": "non-finite value (not a null)",
    "nonfinite_error": "error is null or not finite while the feature is observed",
    "negative_error": "negative error (or non-positive flux-over-error)",
    "bad_correlation": "correlation is null/not finite or outside [-1, 1]",
    "not_positive_definite": "noise covariance is not positive definite",
    "no_observed_fields": "every feature is missing",
    "missing_id": "row id is null",
    "value_out_of_range": "value outside the schema's range",
    "error_out_of_range": "error outside the schema's range",
    "not_representable": "not representable in the working dtype (its square overflows, or a "
    "variance underflows)",
    "duplicate_id": "duplicate id",
    "missing_input": "null value in a column the projection needs (a projected row cannot have "
    "missing fields)",
    "nonpositive_parallax": "parallax <= 0 (the tangential velocity divides by it; select stars "
    "with a precise positive parallax)",
    "not_selected": "outside the schema's selection (not a bad row: excluded and counted)",
}
#: Smallest accepted Cholesky pivot of the per-row correlation matrix.
PIVOT_TOL = 1e-12


@dataclass
class BuildResult:
    """Output of a row builder (all rows, valid or not).

    X : (n, d) observed values, NaN for missing fields.
    X_cov : (n, d, d) noise covariances (rows/columns of missing fields are 0).
    reason : (n,) int8 code into :data:`BAD_REASONS` (0 = valid).
    bad_column : (n,) int16 index into ``columns`` of the offending column (-1 if none/several).
    columns : the logical column names (schema spelling) that ``bad_column`` indexes.
    R : (n, d, D) projections from the D true features to the d observed values, or None when
        the schema has no projection (then d = D).
    """

    X: np.ndarray
    X_cov: np.ndarray
    reason: np.ndarray
    bad_column: np.ndarray
    columns: tuple[str, ...]
    R: np.ndarray | None = None


def dtype_limits(dtype: Any) -> np.ndarray:
    """(3,) [vlim, wlim, wtiny] of a float dtype: the largest |value| or 1-sigma error whose square
    is finite, the largest finite variance and the smallest normal (full-precision) variance."""
    fi = np.finfo(np.dtype(dtype))
    return np.array([math.sqrt(float(fi.max)), float(fi.max), float(fi.tiny)])


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (psutil, as distributed measures it: Linux
    MemAvailable), or None if unknown."""
    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, AttributeError):
        return None


def check_allocation(nbytes: int, what: str) -> None:
    """Raise MemoryError (saying what to do) if ``nbytes`` exceed the memory available now."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise MemoryError(
            f"{what} needs {nbytes / 2**30:.2f} GiB but only {avail / 2**30:.2f} GiB is "
            "available; read fewer rows at a time (row_groups=, smaller partitions) or use "
            "dtype=float32"
        )


def as_table(data: Any) -> pa.Table:
    """A pyarrow Table from a Table, a RecordBatch or a mapping column -> array."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, Mapping):
        return pa.table(
            {
                k: (v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v))
                for k, v in data.items()
            }
        )
    raise TypeError("data must be a pyarrow Table/RecordBatch or a mapping of column -> array")


def resolve_columns(available: list[str], wanted: list[str]) -> tuple[dict[str, str], list[str]]:
    """Case-insensitive match: ({wanted: actual}, [missing]); ambiguity raises KeyError."""
    by_lower: dict[str, list[str]] = {}
    for name in available:
        by_lower.setdefault(name.lower(), []).append(name)
    found, missing = {}, []
    for w in wanted:
        hits = by_lower.get(w.lower(), [])
        if len(hits) > 1 and w in hits:
            found[w] = w
        elif len(hits) > 1:
            raise KeyError(f"column {w!r} is ambiguous: {hits} differ only in case")
        elif hits:
            found[w] = hits[0]
        else:
            missing.append(w)
    return found, missing


@numba.njit(cache=_CACHE, nogil=True)
def _mark_later_duplicates(ids, valid, out):  # pragma: no cover - compiled
    """out[i] = True where valid row i repeats the id of an earlier valid row (hash set with
    Fibonacci hashing and linear probing, load factor <= 1/2)."""
    n = ids.shape[0]
    bits = 1
    while (1 << bits) < 2 * n:
        bits += 1
    mask = (1 << bits) - 1
    keys = np.empty(1 << bits, np.int64)
    used = np.zeros(1 << bits, np.bool_)
    shift = np.uint64(64 - bits)
    mult = np.uint64(11400714819323198485)
    for i in range(n):
        if not valid[i]:
            continue
        k = ids[i]
        h = np.int64((np.uint64(k) * mult) >> shift)
        while used[h] and keys[h] != k:
            h = (h + 1) & mask
        if used[h]:
            out[i] = True
        else:
            used[h] = True
            keys[h] = k
    return 0


def later_duplicates(ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Indices of the valid rows whose id is the id of an earlier valid row (the first is kept)."""
    v = ids[valid] if not valid.all() else ids
    if v.size < 2 or bool(np.all(v[1:] > v[:-1])):  # strictly increasing: no duplicates
        return np.zeros(0, np.int64)
    out = np.zeros(ids.shape[0], np.bool_)
    _mark_later_duplicates(np.ascontiguousarray(ids, np.int64), valid, out)
    return np.flatnonzero(out)

"""Shared pieces of the kernels: the error type, array namespaces, missingness patterns and the
packed-triangle layout."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np


class NotPositiveDefiniteError(ValueError):
    """A matrix T_ij = R_i V_j R_i^T + S_i (or an input covariance) is not positive definite.

    Attributes
    ----------
    row : int
        Index of the offending row in the caller's array (global, not per chunk).
    component : int or None
        Index of the component, or None when the input covariance itself is bad.
    """

    def __init__(self, row: int, component: int | None, detail: str = "") -> None:
        self.row = int(row)
        self.component = None if component is None else int(component)
        where = f"row {self.row}" + ("" if component is None else f", component {component}")
        msg = f"T = R V R^T + S is not positive definite at {where}"
        if detail:
            msg += f" ({detail})"
        msg += (
            "; check that the noise covariance of this row is symmetric positive definite and "
            "that the features are scaled to comparable units (or raise reg_covar)"
        )
        super().__init__(msg)


def array_namespace(*arrays: Any) -> ModuleType:
    """Return ``numpy`` or ``cupy`` according to the arrays' type (CuPy imported only if used)."""
    for a in arrays:
        if a is None:
            continue
        mod = type(a).__module__
        if mod.startswith("cupy"):
            import cupy  # noqa: PLC0415 - lazy on purpose

            return cupy
    return np


def to_numpy(a: Any) -> np.ndarray:
    """Bring an array to host memory (no copy for NumPy input)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


@dataclass(frozen=True)
class Pattern:
    """Rows that share one missingness pattern.

    rows : (n_p,) int64 indices into the caller's rows (host array)
    observed : (d,) int64 indices of the observed features (host array)
    """

    rows: np.ndarray
    observed: np.ndarray


def missingness_patterns(X: Any) -> list[Pattern]:
    """Group rows by which features are observed (not NaN), in the namespace of ``X``: for CuPy
    input the grouping (keys, a stable sort) runs on the device and each pattern's ``rows`` is a
    device array; only the distinct patterns and their counts come to the host.

    Parameters
    ----------
    X : (n, D) array, NaN marks a missing field.

    Raises
    ------
    ValueError
        If a row has no observed field.
    """
    xp = array_namespace(X)
    observed = ~xp.isnan(X)  # (n, D) bool
    n, D = observed.shape
    if n == 0:
        return []
    if bool(observed.all()):
        return [Pattern(xp.arange(n, dtype=xp.int64), np.arange(D, dtype=np.int64))]
    # Encode each row's pattern as an integer key (D <= 62 is plenty for catalogues).
    if D > 62:
        raise ValueError(f"at most 62 features are supported, got {D}")
    bits = xp.asarray(np.int64(1) << np.arange(D, dtype=np.int64))
    keys = xp.sum(xp.asarray(observed, dtype=xp.int64) * bits[None, :], axis=1)
    empty = keys == 0
    if bool(empty.any()):
        row = int(xp.argmax(empty))
        raise ValueError(
            f"row {row} has no observed field (all {D} features are NaN); drop such rows before "
            "fitting"
        )
    order = xp.argsort(keys, kind="stable") if xp is np else xp.argsort(keys)  # CuPy: stable
    uniq, counts = xp.unique(keys[order], return_counts=True)
    uniq, counts = to_numpy(uniq), to_numpy(counts)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    return [
        Pattern(order[s : s + c], np.flatnonzero((int(u) >> np.arange(D)) & 1).astype(np.int64))
        for u, s, c in zip(uniq, starts, counts, strict=True)
    ]


def packed_index(observed: np.ndarray) -> np.ndarray:
    """Columns of a packed lower triangle (entry (a, b), a >= b, at a (a + 1) / 2 + b) that hold
    the packed sub-triangle of the fields ``observed`` (sorted), in its own packed order."""
    o = np.asarray(observed, dtype=np.int64)
    return np.array([o[a] * (o[a] + 1) // 2 + o[b] for a in range(len(o)) for b in range(a + 1)])


@functools.cache
def tril(d: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.tril_indices(d)``, made once per ``d`` (read-only): the kernels' packing needs
    them on every call."""
    r, c = np.tril_indices(d)
    r.flags.writeable = c.flags.writeable = False
    return r, c


def stats_from_sums(tot: np.ndarray, K: int, D: int):
    """(1 + D + D (D + 1) / 2, K) float64 sums (n_j, a_j, packed lower C_j) -> n_j (K,),
    a (K, D), C (K, D, D) symmetric: the compiled kernels' accumulator rows."""
    n_j = tot[0].copy()
    a = np.ascontiguousarray(tot[1 : 1 + D].T)
    r, c = tril(D)
    C = np.empty((K, D, D))
    C[:, r, c] = tot[1 + D :].T
    C[:, c, r] = tot[1 + D :].T
    return n_j, a, C


def unpack_lower(Sp: Any) -> Any:
    """(n, d (d + 1) / 2) packed lower triangles -> (n, d, d) symmetric, same namespace."""
    xp = array_namespace(Sp)
    n, k = Sp.shape
    d = int(round((np.sqrt(8 * k + 1) - 1) / 2))
    if d * (d + 1) // 2 != k:
        raise ValueError(f"{k} columns are not a packed lower triangle")
    r, c = tril(d)
    S = xp.empty((n, d, d), dtype=Sp.dtype)
    S[:, xp.asarray(r), xp.asarray(c)] = Sp
    S[:, xp.asarray(c), xp.asarray(r)] = Sp
    return S

"""Shared pieces of the kernels: array namespaces, input checks, missingness patterns, and the
dispatcher's preparation (validation, centring) and per-pattern gathering."""

from __future__ import annotations

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


def stats_from_sums(tot: np.ndarray, K: int, D: int):
    """(1 + D + D (D + 1) / 2, K) float64 sums (n_j, a_j, packed lower C_j) -> n_j (K,),
    a (K, D), C (K, D, D) symmetric: the compiled kernels' accumulator rows."""
    n_j = tot[0].copy()
    a = np.ascontiguousarray(tot[1 : 1 + D].T)
    r, c = np.tril_indices(D)
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
    r, c = np.tril_indices(d)
    S = xp.empty((n, d, d), dtype=Sp.dtype)
    S[:, xp.asarray(r), xp.asarray(c)] = Sp
    S[:, xp.asarray(c), xp.asarray(r)] = Sp
    return S


def check_inputs(
    X: Any,
    X_cov: Any,
    weights: Any,
    means: Any,
    covariances: Any,
    row_weights: Any = None,
    R: Any = None,
) -> None:
    """Validate shapes and values of a kernel call; raise ValueError naming the row and column.

    Checks: shapes agree; X_cov finite, symmetric, non-negative variances, positive definite on the
    observed block of every row (one batched Cholesky, so cheap compared with a statistics pass);
    X has no +-inf (NaN means missing); row weights finite and non-negative.
    """
    xp = array_namespace(X, X_cov)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-d (n_rows, n_features), got shape {tuple(X.shape)}")
    if X_cov.ndim == 2:  # packed lower triangles: check them as full matrices
        if X_cov.shape != (X.shape[0], X.shape[1] * (X.shape[1] + 1) // 2):
            raise ValueError(
                f"packed X_cov must have shape (n_rows, d (d + 1) / 2) = "
                f"{(X.shape[0], X.shape[1] * (X.shape[1] + 1) // 2)}, got {tuple(X_cov.shape)}"
            )
        X_cov = unpack_lower(X_cov)
    n = X.shape[0]
    K, D = means.shape
    d = X.shape[1]
    if R is None and d != D:
        raise ValueError(f"X has {d} features but the model has {D}")
    if tuple(X_cov.shape) != (n, d, d):
        raise ValueError(
            f"X_cov must have shape (n_rows, n_features, n_features) = {(n, d, d)}, "
            f"got {tuple(X_cov.shape)}"
        )
    if tuple(weights.shape) != (K,) or tuple(covariances.shape) != (K, D, D):
        raise ValueError(
            f"parameter shapes disagree: weights {tuple(weights.shape)}, means {(K, D)}, "
            f"covariances {tuple(covariances.shape)}"
        )
    if R is not None and tuple(R.shape) != (n, d, D):
        raise ValueError(f"R must have shape (n_rows, d, D) = {(n, d, D)}, got {tuple(R.shape)}")
    if row_weights is not None:
        if tuple(row_weights.shape) != (n,):
            raise ValueError(f"row weights must have shape ({n},), got {tuple(row_weights.shape)}")
        bad = to_numpy(~xp.isfinite(row_weights) | (row_weights < 0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"row {row}: row weight must be finite and >= 0")
    inf = to_numpy(xp.isinf(X))
    if inf.any():
        row, col = np.argwhere(inf)[0]
        raise ValueError(f"row {row}, column {col}: X is infinite (use NaN for a missing field)")
    _check_covariances(X, X_cov)


def _check_covariances(X: Any, X_cov: Any) -> None:
    xp = array_namespace(X_cov)
    n, d, _ = X_cov.shape
    if n == 0:
        return
    finite = to_numpy(xp.isfinite(X_cov))  # (n, d, d)
    observed = to_numpy(~xp.isnan(X))  # (n, d)
    both = observed[:, :, None] & observed[:, None, :]
    bad = both & ~finite
    if bad.any():
        row, i, j = np.argwhere(bad)[0]
        raise ValueError(f"row {row}, column {i}: X_cov[{i}, {j}] is not finite")
    diag = to_numpy(xp.diagonal(X_cov, axis1=1, axis2=2))  # (n, d)
    neg = observed & (diag < 0)
    if neg.any():
        row, col = np.argwhere(neg)[0]
        raise ValueError(f"row {row}, column {col}: negative variance {diag[row, col]:g} in X_cov")
    Sh = to_numpy(X_cov)
    asym = np.abs(Sh - np.swapaxes(Sh, 1, 2))
    scale = np.sqrt(np.abs(diag[:, :, None] * diag[:, None, :])) + np.finfo(np.float64).tiny
    tol = 1e-6 if Sh.dtype == np.float64 else 1e-4
    nonsym = both & (asym > tol * scale) & np.isfinite(asym)
    if nonsym.any():
        row, i, j = np.argwhere(nonsym)[0]
        raise ValueError(f"row {row}, column {i}: X_cov is not symmetric (entry [{i}, {j}])")
    # Positive semi-definiteness of each observed block: S may be singular (zero noise is allowed,
    # T = V + S is then still positive definite), but it must not have a negative eigenvalue.
    for pat in missingness_patterns(X):
        o = pat.observed
        block = Sh[np.ix_(to_numpy(pat.rows), o, o)].astype(np.float64)
        # Eigenvalues relative to the block's scale; tolerate round-off.
        scl = np.maximum(np.abs(np.diagonal(block, axis1=1, axis2=2)).max(axis=1), 1e-300)
        ev_min = np.linalg.eigvalsh(block / scl[:, None, None])[:, 0]
        neg = ev_min < -1e-6 if Sh.dtype == np.float32 else ev_min < -1e-10
        if neg.any():
            k = int(np.flatnonzero(neg)[0])
            raise ValueError(
                f"row {int(pat.rows[k])}: X_cov is not positive semi-definite on its observed "
                f"fields (smallest scaled eigenvalue {ev_min[k]:.3g})"
            )


def prepare(X, X_cov, params, R, row_weights, check):
    """Validate, cast parameters (:class:`xd_dask.params.Params`) to float64 and centre the
    data; returns the pieces per call."""
    xp = array_namespace(X, X_cov)
    if X.dtype not in (xp.float32, xp.float64):
        X = xp.asarray(X, dtype=xp.float64)
    if X_cov.dtype != X.dtype:
        X_cov = xp.asarray(X_cov, dtype=X.dtype)
    weights = np.asarray(to_numpy(params.weights), dtype=np.float64)
    means = np.asarray(to_numpy(params.means), dtype=np.float64)
    covariances = np.asarray(to_numpy(params.covariances), dtype=np.float64)
    if check:
        check_inputs(X, X_cov, weights, means, covariances, row_weights, R)
    if np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError("mixture weights must be finite and non-negative")
    with np.errstate(divide="ignore"):
        log_weights = np.log(weights)
    # Centre: x_i - R_i c and m_j - c with c the mixture mean (exact translation invariance).
    c = weights @ means / max(weights.sum(), np.finfo(float).tiny)  # (D,)
    c_x = xp.asarray(c, dtype=xp.float64)
    if R is None:
        # one float64 temporary (the cast happens inside the subtraction), then X's dtype
        Xc = xp.asarray(xp.subtract(X, c_x[None, :], dtype=xp.float64), dtype=X.dtype)
    else:
        Rc = xp.einsum("nid,d->ni", xp.asarray(R, dtype=xp.float64), c_x)
        Xc = xp.asarray(xp.asarray(X, dtype=xp.float64) - Rc, dtype=X.dtype)
    return xp, Xc, X_cov, log_weights, means - c[None, :], covariances, c


def pattern_blocks(xp, Xc, X_cov, R, pat):
    """The observed sub-vectors / sub-blocks of one pattern's rows, with as few copies as possible:
    none when the pattern is every row with every field, one gather otherwise (fresh large arrays
    are expensive to fault in, so chained fancy indexing costs more than the kernel itself)."""
    n, D = Xc.shape
    all_rows = len(pat.rows) == n  # patterns partition the rows, so this means rows == arange(n)
    all_fields = len(pat.observed) == D
    packed = X_cov.ndim == 2  # (n, D (D + 1) / 2) lower triangles: S comes back packed too
    if all_rows and all_fields:
        x, S, Rp = Xc, X_cov, R
    else:
        rows = xp.asarray(pat.rows)
        if all_fields:
            x, S = Xc[rows], X_cov[rows]
            Rp = None if R is None else R[rows]
        else:
            o = xp.asarray(pat.observed)
            x = Xc[rows[:, None], o[None, :]]
            if packed:
                S = X_cov[rows[:, None], xp.asarray(packed_index(pat.observed))[None, :]]
            else:
                S = X_cov[rows[:, None, None], o[None, :, None], o[None, None, :]]
            Rp = None if R is None else R[rows][:, o, :]
    if Rp is not None:
        Rp = xp.asarray(Rp, dtype=Xc.dtype)
    if xp is np:
        x = np.ascontiguousarray(x)
        S = np.ascontiguousarray(S)
    return x, S, Rp

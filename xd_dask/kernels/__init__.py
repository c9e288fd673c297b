"""XD kernels: sufficient statistics and per-row quantities for blocks of noisy rows.

Pure array functions; nothing here knows about Dask, files or configuration.

Two implementations of one contract (per missingness pattern, see :mod:`.reference`):

- ``"reference"``: array-namespace code (NumPy or CuPy), batched linear algebra; also the GPU path.
- ``"numba"``: the compiled CPU kernel (:mod:`._numba`), used by default for NumPy inputs without
  projections.

The dispatcher groups rows by missingness pattern (NaN in ``X`` marks an unobserved field; the
row's likelihood is the exact marginal over its observed fields), centres the data on the
mixture's mean (translation leaves every statistic unchanged and keeps float32 accurate when the
data sit far from the origin), calls the backend per pattern and scatters the observed-space
statistics back into the full D-space.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from xd_dask.kernels import reference as _ref
from xd_dask.kernels._common import (
    NotPositiveDefiniteError,
    array_namespace,
    check_inputs,
    missingness_patterns,
    to_numpy,
)

__all__ = [
    "Background",
    "NotPositiveDefiniteError",
    "SuffStats",
    "compute_stats",
    "log_component_densities",
    "posterior",
    "responsibilities",
    "row_log_likelihood",
]

BACKENDS = ("auto", "numba", "reference")


@dataclass
class SuffStats:
    """Sufficient statistics of a set of rows relative to the current parameters (DESIGN.md 3).

    n : (K,) sum_i w_i r_ij;  a : (K, D) sum_i w_i r_ij R_i^T u_ij;
    C : (K, D, D) sum_i w_i r_ij R_i^T (u_ij u_ij^T - T_ij^-1) R_i;
    ll : sum_i w_i log p(x_i);  W : sum_i w_i;  n_rows : number of rows seen;
    n_bg : sum_i w_i r_i,bg, the background component's share (0 without a background).
    Statistics of disjoint row sets combine by ``+``.
    """

    n: np.ndarray
    a: np.ndarray
    C: np.ndarray
    ll: float
    W: float
    n_rows: int
    n_bg: float = 0.0

    @classmethod
    def zeros(cls, n_components: int, n_features: int) -> SuffStats:
        K, D = n_components, n_features
        return cls(np.zeros(K), np.zeros((K, D)), np.zeros((K, D, D)), 0.0, 0.0, 0)

    def __add__(self, other: SuffStats) -> SuffStats:
        if not isinstance(other, SuffStats):
            return NotImplemented
        if self.a.shape != other.a.shape:
            raise ValueError(f"cannot add statistics of shapes {self.a.shape} and {other.a.shape}")
        return SuffStats(
            self.n + other.n,
            self.a + other.a,
            self.C + other.C,
            self.ll + other.ll,
            self.W + other.W,
            self.n_rows + other.n_rows,
            self.n_bg + other.n_bg,
        )

    def __radd__(self, other: Any) -> SuffStats:  # lets sum() start from 0
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    @property
    def mean_loglike(self) -> float:
        """Mean log-likelihood per (weighted) row."""
        return self.ll / self.W if self.W > 0 else float("nan")

    @property
    def nbytes(self) -> int:
        return int(self.n.nbytes + self.a.nbytes + self.C.nbytes + 32)

    def to_numpy(self) -> SuffStats:
        return SuffStats(
            to_numpy(self.n),
            to_numpy(self.a),
            to_numpy(self.C),
            float(self.ll),
            float(self.W),
            int(self.n_rows),
            float(self.n_bg),
        )


@dataclass(frozen=True)
class Background:
    """A uniform background (outlier) component (DESIGN.md 4d; pygmmis' approach).

    The density of a row is ``sum_j alpha_j N(x_i | R_i m_j, T_ij) + weight / volume_i`` where
    ``volume_i`` is the volume of the box ``[lo, hi]`` over the row's OBSERVED fields (the
    marginal of a uniform box is uniform on the remaining fields), so the Gaussian weights
    alpha_j sum to ``1 - weight``. The box is fixed (in the units of X's columns); the weight
    is fitted. The noise is not convolved into the box: it is meant for rows far outside the
    Gaussians, whose errors are small against the box.

    weight : float in [0, 1).
    lo, hi : (d,) corners of the box, hi > lo, finite.
    """

    weight: float
    lo: tuple[float, ...]
    hi: tuple[float, ...]

    def __post_init__(self) -> None:
        w = float(self.weight)
        if not (0.0 <= w < 1.0):
            raise ValueError(f"background weight must be in [0, 1), got {self.weight!r}")
        lo = np.asarray(self.lo, dtype=np.float64).ravel()
        hi = np.asarray(self.hi, dtype=np.float64).ravel()
        if lo.shape != hi.shape or lo.size == 0:
            raise ValueError(f"background box corners disagree: lo {lo.shape}, hi {hi.shape}")
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(hi > lo)):
            raise ValueError("background box must be finite with hi > lo in every column")
        if not np.all(np.isfinite(np.log(hi - lo))):
            raise ValueError("background box is too large or too small to have a finite volume")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "lo", tuple(float(v) for v in lo))
        object.__setattr__(self, "hi", tuple(float(v) for v in hi))

    @property
    def log_widths(self) -> np.ndarray:
        """(d,) log of the box's width along each column."""
        return np.log(np.asarray(self.hi) - np.asarray(self.lo))

    def log_density(self, observed: Any) -> float | None:
        """Log density (weight included) on the fields ``observed``; None when the weight is 0."""
        if self.weight <= 0.0:
            return None
        return float(np.log(self.weight) - self.log_widths[observed].sum())

    def row_log_density(self, X: Any) -> Any:
        """(n,) log density (weight included) of each row on its observed fields (-inf if off)."""
        xp = array_namespace(X)
        obs = xp.asarray(~xp.isnan(X), dtype=xp.float64)  # (n, d)
        if self.weight <= 0.0:
            return xp.full(X.shape[0], -np.inf)
        return float(np.log(self.weight)) - obs @ xp.asarray(self.log_widths, dtype=xp.float64)


def _numba_backend():
    from xd_dask.kernels import _numba  # noqa: PLC0415 - compiled lazily, only when used

    return _numba


def _resolve_backend(backend: str, X: Any, R: Any) -> str:
    """Pick the kernel. ``"auto"`` honours the environment variable ``XD_DASK_BACKEND``
    ("numba" | "reference"), which lets an operator force the portable kernel everywhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    is_numpy = array_namespace(X) is np
    if backend == "auto":
        env = os.environ.get("XD_DASK_BACKEND", "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"XD_DASK_BACKEND must be one of {BACKENDS}, got {env!r}")
        if env == "reference" or (env == "numba" and is_numpy and R is None):
            return env
    if backend == "auto":
        return "numba" if (is_numpy and R is None) else "reference"
    if backend == "numba" and (not is_numpy or R is not None):
        raise ValueError("the numba backend takes NumPy inputs without projections R")
    return backend


def _prepare(X, X_cov, weights, means, covariances, R, row_weights, check):
    """Validate, cast parameters to float64 and centre the data; returns the pieces per call."""
    xp = array_namespace(X, X_cov)
    if X.dtype not in (xp.float32, xp.float64):
        X = xp.asarray(X, dtype=xp.float64)
    if X_cov.dtype != X.dtype:
        X_cov = xp.asarray(X_cov, dtype=X.dtype)
    weights = np.asarray(to_numpy(weights), dtype=np.float64)
    means = np.asarray(to_numpy(means), dtype=np.float64)
    covariances = np.asarray(to_numpy(covariances), dtype=np.float64)
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
        Xc = xp.asarray(xp.asarray(X, dtype=xp.float64) - c_x[None, :], dtype=X.dtype)
    else:
        Rc = xp.einsum("nid,d->ni", xp.asarray(R, dtype=xp.float64), c_x)
        Xc = xp.asarray(xp.asarray(X, dtype=xp.float64) - Rc, dtype=X.dtype)
    return xp, Xc, X_cov, log_weights, means - c[None, :], covariances, c


def _pattern_blocks(xp, Xc, X_cov, R, pat):
    """The observed sub-vectors / sub-blocks of one pattern's rows, with as few copies as possible:
    none when the pattern is every row with every field, one gather otherwise (fresh large arrays
    are expensive to fault in, so chained fancy indexing costs more than the kernel itself)."""
    n, D = Xc.shape
    all_rows = len(pat.rows) == n  # patterns partition the rows, so this means rows == arange(n)
    all_fields = len(pat.observed) == D
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
            S = X_cov[rows[:, None, None], o[None, :, None], o[None, None, :]]
            Rp = None if R is None else R[rows][:, o, :]
    if Rp is not None:
        Rp = xp.asarray(Rp, dtype=Xc.dtype)
    if xp is np:
        x = np.ascontiguousarray(x)
        S = np.ascontiguousarray(S)
    return x, S, Rp


def compute_stats(
    X: Any,
    X_cov: Any,
    weights: Any,
    means: Any,
    covariances: Any,
    *,
    row_weights: Any = None,
    R: Any = None,
    backend: str = "auto",
    chunk_bytes: int | None = None,
    check: bool = True,
    background: Background | None = None,
) -> SuffStats:
    """Sufficient statistics (DESIGN.md section 3) of a block of rows.

    Parameters
    ----------
    X : (n, d) float32/float64 (NumPy or CuPy), NaN marks a missing field.
    X_cov : (n, d, d) noise covariances S_i.
    weights : (K,), means : (K, D), covariances : (K, D, D) current parameters.
    row_weights : (n,), optional, default 1.
    R : (n, d, D), optional projection matrices (d == D without R).
    backend : "auto" | "numba" | "reference".
    chunk_bytes : working-set bound of the reference kernel (default 128 MiB).
    check : validate the inputs first (shapes, finite/PSD noise covariances). Readers that have
        already validated the rows may pass False.
    background : optional uniform background component (:class:`Background`); it takes part
        in every row's normalisation, ``ll`` includes it and ``n_bg`` sums its responsibilities.

    Returns
    -------
    SuffStats with NumPy arrays, accumulated in float64.
    """
    backend = _resolve_backend(backend, X, R)
    xp, Xc, X_cov, log_weights, m, V, _ = _prepare(
        X, X_cov, weights, means, covariances, R, row_weights, check
    )
    n = X.shape[0]
    K, D = m.shape
    rw = (
        xp.ones(n, dtype=xp.float64)
        if row_weights is None
        else xp.asarray(row_weights, dtype=xp.float64)
    )
    total = SuffStats.zeros(K, D)
    total.n_rows = int(n)
    for pat in missingness_patterns(Xc):
        x, S, Rp = _pattern_blocks(xp, Xc, X_cov, R, pat)
        o = pat.observed
        rwp = rw[xp.asarray(pat.rows)]
        lbg = None if background is None else background.log_density(o)
        try:
            if backend == "numba":
                nj, a, C, ll, W, nbg = _numba_backend().pattern_stats_numba(
                    x,
                    S,
                    np.ascontiguousarray(rwp),
                    log_weights,
                    np.ascontiguousarray(m[:, o]),
                    np.ascontiguousarray(V[np.ix_(np.arange(K), o, o)]),
                    lbg,
                )
            elif R is None:
                nj, a, C, ll, W, nbg = _ref.pattern_stats_ref(
                    x,
                    S,
                    rwp,
                    xp.asarray(log_weights),
                    xp.asarray(m[:, o]),
                    xp.asarray(V[np.ix_(np.arange(K), o, o)]),
                    None,
                    chunk_bytes,
                    lbg,
                )
            else:
                nj, a, C, ll, W, nbg = _ref.pattern_stats_ref(
                    x,
                    S,
                    rwp,
                    xp.asarray(log_weights),
                    xp.asarray(m),
                    xp.asarray(V),
                    Rp,
                    chunk_bytes,
                    lbg,
                )
        except NotPositiveDefiniteError as err:
            raise NotPositiveDefiniteError(int(pat.rows[err.row]), err.component) from None
        nj, a, C = to_numpy(nj), to_numpy(a), to_numpy(C)
        total.n += nj
        if R is None:
            total.a[:, o] += a
            total.C[np.ix_(np.arange(K), o, o)] += C
        else:
            total.a += a
            total.C += C
        total.ll += float(ll)
        total.W += float(W)
        total.n_bg += float(nbg)
    return total


def log_component_densities(
    X: Any,
    X_cov: Any,
    weights: Any,
    means: Any,
    covariances: Any,
    *,
    R: Any = None,
    backend: str = "auto",
    chunk_bytes: int | None = None,
    check: bool = True,
) -> np.ndarray:
    """(n, K) array of log alpha_j + log N(x_i | R_i m_j, T_ij) over each row's observed fields."""
    backend = _resolve_backend(backend, X, R)
    xp, Xc, X_cov, log_weights, m, V, _ = _prepare(
        X, X_cov, weights, means, covariances, R, None, check
    )
    K = m.shape[0]
    out = xp.empty((X.shape[0], K), dtype=xp.float64)
    for pat in missingness_patterns(Xc):
        x, S, Rp = _pattern_blocks(xp, Xc, X_cov, R, pat)
        o = pat.observed
        try:
            if backend == "numba":
                lp = _numba_backend().pattern_logdens_numba(
                    x,
                    S,
                    log_weights,
                    np.ascontiguousarray(m[:, o]),
                    np.ascontiguousarray(V[np.ix_(np.arange(K), o, o)]),
                )
            elif R is None:
                lp = _ref.pattern_logdens_ref(
                    x, S, log_weights, m[:, o], V[np.ix_(np.arange(K), o, o)], None, chunk_bytes
                )
            else:
                lp = _ref.pattern_logdens_ref(x, S, log_weights, m, V, Rp, chunk_bytes)
        except NotPositiveDefiniteError as err:
            raise NotPositiveDefiniteError(int(pat.rows[err.row]), err.component) from None
        out[xp.asarray(pat.rows)] = xp.asarray(lp)
    return out


def _row_totals(X: Any, logp: Any, background: Background | None) -> Any:
    """(n,) log p(x_i) from the (n, K) log component densities (+ the background's term)."""
    lse = _ref._logsumexp_rows(logp)
    if background is None or background.weight <= 0.0:
        return lse
    xp = array_namespace(logp)
    return xp.logaddexp(lse, background.row_log_density(X))


def row_log_likelihood(
    X, X_cov, weights, means, covariances, *, background: Background | None = None, **kw
) -> Any:
    """(n,) log p(x_i) = log [sum_j alpha_j N(x_i | R_i m_j, T_ij) (+ background)]."""
    logp = log_component_densities(X, X_cov, weights, means, covariances, **kw)
    return _row_totals(X, logp, background)


def responsibilities(
    X, X_cov, weights, means, covariances, *, background: Background | None = None, **kw
) -> Any:
    """(n, K) posterior component probabilities r_ij (rows sum to 1, or to 1 - r_i,bg with a
    background component)."""
    logp = log_component_densities(X, X_cov, weights, means, covariances, **kw)
    xp = array_namespace(logp)
    return xp.exp(logp - _row_totals(X, logp, background)[:, None])


def posterior(
    X: Any,
    X_cov: Any,
    weights: Any,
    means: Any,
    covariances: Any,
    *,
    R: Any = None,
    chunk_bytes: int | None = None,
    check: bool = True,
    return_resp: bool = False,
):
    """Per-row deconvolved posterior of the true value v_i (mixture over components).

    Returns
    -------
    mean : (n, D), cov : (n, D, D) (float64), and resp : (n, K) when ``return_resp``.
    """
    xp, Xc, X_cov, log_weights, m, V, c = _prepare(
        X, X_cov, weights, means, covariances, R, None, check
    )
    n = X.shape[0]
    K, D = m.shape
    mean = xp.empty((n, D), dtype=xp.float64)
    cov = xp.empty((n, D, D), dtype=xp.float64)
    resp = xp.empty((n, K), dtype=xp.float64)
    for pat in missingness_patterns(Xc):
        x, S, Rp = _pattern_blocks(xp, Xc, X_cov, R, pat)
        try:
            mu, Sig, r = _ref.pattern_posterior_ref(
                x,
                S,
                xp.asarray(log_weights),
                xp.asarray(m),
                xp.asarray(V),
                pat.observed,
                Rp,
                chunk_bytes,
            )
        except NotPositiveDefiniteError as err:
            raise NotPositiveDefiniteError(int(pat.rows[err.row]), err.component) from None
        rows = xp.asarray(pat.rows)
        mean[rows] = mu + xp.asarray(c, dtype=xp.float64)[None, :]
        cov[rows] = Sig
        resp[rows] = r
    if return_resp:
        return mean, cov, resp
    return mean, cov

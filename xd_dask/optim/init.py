"""Initial parameters of PROJECTED rows (x_i = R_i v_i + noise, where k-means cannot run: 2-d
projections of 3-d vectors): the method of moments (Dehnen & Binney 1998). The k-means start of
unprojected rows is :mod:`xd_dask.optim.kmeans`.

Method of moments, from sums that add up over rows (so a cluster computes them by two
map / tree-reduce passes, :func:`xd_dask.distributed.kmeans.moment_init`, and the start is the
one an in-memory fit of the same rows gets):

1. mean: <v> = (sum_i R_i^T R_i)^-1 sum_i R_i^T x_i (least squares);
2. dispersion tensor Sigma (its D (D + 1) / 2 unique elements) from the linear moment equations
   (r_i r_i^T)_ab - S_i,ab = (R_i Sigma R_i^T)_ab, r_i = x_i - R_i <v>, for every pair a <= b
   of observed fields, solved in least squares through the normal equations (sums of M^T M and
   M^T rhs);
3. K components: weights 1 / K, means <v> + seeded draws from N(0, Sigma), covariances Sigma
   (its eigenvalues floored when the moment solution is not positive definite).

Missing fields (NaN) take no part: their rows of R_i and their equations are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from xd_dask.kernels._common import to_numpy
from xd_dask.params import Params

__all__ = [
    "MomentSums",
    "moment_init",
    "moment_solution",
    "moment_start",
    "moment_sums",
]

#: Rows per chunk of :func:`moment_sums` (bounds its working memory).
MOMENT_CHUNK_ROWS = 1 << 15
#: Eigenvalue floor of a moment dispersion tensor that is not positive definite, relative to
#: its largest eigenvalue.
MOMENT_EIG_FLOOR = 1e-3


@dataclass
class MomentSums:
    """Sums of the method of moments over rows (they add up across blocks of rows).

    n : rows summed.  A : (D, D) sum R_i^T R_i.  b : (D,) sum R_i^T x_i.
    MtM : (P, P) and Mtr : (P,), P = D (D + 1) / 2, the normal equations of the dispersion
    tensor's unique elements (upper triangle, row-major), about a given mean; zero in the
    first pass (no mean yet).
    """

    n: int
    A: np.ndarray
    b: np.ndarray
    MtM: np.ndarray
    Mtr: np.ndarray

    @classmethod
    def zeros(cls, D: int) -> MomentSums:
        P = D * (D + 1) // 2
        return cls(0, np.zeros((D, D)), np.zeros(D), np.zeros((P, P)), np.zeros(P))

    def __add__(self, other: MomentSums) -> MomentSums:
        return MomentSums(
            self.n + other.n,
            self.A + other.A,
            self.b + other.b,
            self.MtM + other.MtM,
            self.Mtr + other.Mtr,
        )


def _noise_pairs(S: np.ndarray, qa: np.ndarray, qb: np.ndarray) -> np.ndarray:
    """(n, Q) S_i[qa, qb] (qa <= qb) from (n, d, d) or packed lower triangles (n, d (d+1) / 2)."""
    if S.ndim == 3:
        return S[:, qa, qb]
    return S[:, qb * (qb + 1) // 2 + qa]


def moment_sums(X: Any, X_cov: Any, R: Any, mean: np.ndarray | None = None) -> MomentSums:
    """Method-of-moments sums of a block of rows (module docstring).

    Parameters
    ----------
    X : (n, d), NaN = missing.  X_cov : (n, d, d), or packed lower triangles (n, d (d + 1) / 2).
    R : (n, d, D) projections (NumPy or CuPy; moved to the host, summed in float64).
    mean : (D,) the mean velocity: given, also the dispersion's normal equations about it.
    """
    X, S, R = (np.asarray(to_numpy(a), dtype=np.float64) for a in (X, X_cov, R))
    n, d, D = R.shape
    out = MomentSums.zeros(D)
    out.n = int(n)
    qa, qb = np.triu_indices(d)  # pairs of observed fields
    pk, pl = np.triu_indices(D)  # unique elements of Sigma
    for s in range(0, n, MOMENT_CHUNK_ROWS):
        x = X[s : s + MOMENT_CHUNK_ROWS]
        obs = ~np.isnan(x)  # (m, d)
        x = np.where(obs, x, 0.0)
        Rc = np.where(obs[:, :, None], R[s : s + MOMENT_CHUNK_ROWS], 0.0)  # missing rows 0
        out.A += Rc.reshape(-1, D).T @ Rc.reshape(-1, D)
        out.b += Rc.reshape(-1, D).T @ x.reshape(-1)
        if mean is None:
            continue
        Rt = np.ascontiguousarray(Rc.transpose(1, 2, 0))  # (d, D, m): contiguous columns
        r = x.T - np.einsum("adm,d->am", Rt, np.asarray(mean, dtype=np.float64))  # (d, m)
        both = obs[:, qa].T & obs[:, qb].T  # (Q, m) pairs of observed fields
        noise = np.where(both, _noise_pairs(S[s : s + MOMENT_CHUNK_ROWS], qa, qb).T, 0.0)
        rhs = r[qa] * r[qb] - noise  # (Q, m)
        # M[(a, b), (k, l), i] = R_ak R_bl + R_al R_bk (k < l), R_ak R_bk (k = l)
        M = np.empty((len(pk), x.shape[0]))  # (P, m) for one pair (a, b)
        for q, (a, b) in enumerate(zip(qa, qb, strict=True)):
            for p, (k, l) in enumerate(zip(pk, pl, strict=True)):
                np.multiply(Rt[a, k], Rt[b, l], out=M[p])
                if k != l:
                    M[p] += Rt[a, l] * Rt[b, k]
            out.MtM += M @ M.T
            out.Mtr += M @ rhs[q]
    return out


def moment_solution(first: MomentSums, second: MomentSums | None = None):
    """The mean (D,) from the first pass's sums; with the second pass's sums (about that mean)
    also the dispersion tensor (D, D) (symmetric, possibly not positive definite).

    Raises ValueError when the projections do not determine the mean (sum R^T R singular).
    """
    D = first.b.shape[0]
    if first.n == 0 or np.linalg.matrix_rank(first.A) < D:
        raise ValueError(
            f"the projections of the {first.n} rows do not determine a mean in {D} dimensions "
            "(sum of R_i^T R_i is singular); start from a model instead (fit.init)"
        )
    mean = np.linalg.solve(first.A, first.b)
    if second is None:
        return mean, None
    sol = np.linalg.lstsq(second.MtM, second.Mtr, rcond=None)[0]
    Sigma = np.zeros((D, D))
    pk, pl = np.triu_indices(D)
    Sigma[pk, pl] = sol
    Sigma[pl, pk] = sol
    return mean, Sigma


def moment_start(
    mean: np.ndarray, Sigma: np.ndarray, n_components: int, random_state: Any, reg_covar: float
) -> Params:
    """Weights 1/K, means ``mean`` + seeded draws from N(0, Sigma), covariances Sigma (+
    ``reg_covar``); a Sigma that is not positive definite gets its eigenvalues floored at
    :data:`MOMENT_EIG_FLOOR` times the largest."""
    K, D = int(n_components), mean.shape[0]
    evals, evecs = np.linalg.eigh(0.5 * (Sigma + Sigma.T))
    if not evals[-1] > 0:
        raise ValueError(
            f"the moment equations give no positive dispersion (eigenvalues {evals}); start "
            "from a model instead (fit.init)"
        )
    evals = np.maximum(evals, MOMENT_EIG_FLOOR * evals[-1])
    Sig = (evecs * evals) @ evecs.T + reg_covar * np.eye(D)
    Sig = 0.5 * (Sig + Sig.T)
    z = np.random.default_rng(random_state).standard_normal((K, D))
    means = mean + z @ np.linalg.cholesky(Sig).T
    return Params(np.full(K, 1.0 / K), means, np.repeat(Sig[None], K, axis=0))


def moment_init(
    X: Any, X_cov: Any, R: Any, n_components: int, random_state: Any, reg_covar: float
) -> Params:
    """Method-of-moments start of projected rows in memory (module docstring): the same start
    as :func:`xd_dask.distributed.kmeans.moment_init` on a catalogue of the same rows."""
    first = moment_sums(X, X_cov, R)
    mean, _ = moment_solution(first)
    mean, Sigma = moment_solution(first, moment_sums(X, X_cov, R, mean))
    return moment_start(mean, Sigma, n_components, random_state, reg_covar)

"""Reference XD kernel written against the array namespace of its inputs (NumPy or CuPy).

Every function here works per missingness pattern: ``x`` holds only the observed fields of its
rows, ``S`` the matching sub-blocks of the noise covariances. Without projections the parameters
passed in are the observed sub-vectors/sub-blocks and the statistics come back in that observed
sub-space; with projections ``R`` (n, d, D) the parameters are full and the statistics are in the
full D-space (R_i^T u_ij etc.). The dispatcher in :mod:`xd_dask.kernels` does the grouping and
scattering. No ``np.`` call touches data here: ``xp`` is the inputs' namespace, so the same code
runs on CuPy arrays on a GPU worker.

Per pair (row i, component j), DESIGN.md section 2:
    T_ij = R_i V_j R_i^T + S_i,  w_ij = x_i - R_i m_j,  L_ij = chol(T_ij)
    log N_ij = -1/2 (d log 2 pi + log det T_ij + |L_ij^-1 w_ij|^2),  u_ij = T_ij^-1 w_ij
"""

from __future__ import annotations

import math

from xd_dask.kernels._common import NotPositiveDefiniteError, array_namespace
from xd_dask.kernels.codegen import algebra
from xd_dask.kernels.codegen.algebra import PAD_LOGW

#: Default bound on the per-chunk working set of the reference kernel (bytes).
DEFAULT_CHUNK_BYTES = 128 * 2**20
_PAIR_ARRAYS = 6  # T, L, L^-1, T^-1, plus slack for temporaries: d x d arrays per pair


def chunk_rows(n_components: int, d: int, itemsize: int, chunk_bytes: int | None) -> int:
    """Rows per chunk so that chunk x K x d x d x (a few arrays) fits in ``chunk_bytes``."""
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    per_row = max(1, n_components * d * d * itemsize * _PAIR_ARRAYS)
    return max(1, budget // per_row)


def _pair_terms(x, S, means, covs, R, row0):
    """Per-pair T^-1, w, u and log N for one chunk.

    Returns
    -------
    logN : (n, K)   log N(x_i | R_i m_j, T_ij)
    u : (n, K, d)   T_ij^-1 w_ij
    Tinv : (n, K, d, d)
    """
    xp = array_namespace(x, S)
    n, d = x.shape
    if R is None:
        T = covs[None, :, :, :] + S[:, None, :, :]  # (n, K, d, d)
        w = x[:, None, :] - means[None, :, :]  # (n, K, d)
    else:
        RV = xp.einsum("nid,kde->nkie", R, covs)  # (n, K, d, D)
        T = xp.einsum("nkie,nje->nkij", RV, R) + S[:, None, :, :]
        w = x[:, None, :] - xp.einsum("nid,kd->nki", R, means)
    try:
        L = xp.linalg.cholesky(T)
        diagL = xp.diagonal(L, axis1=-2, axis2=-1)  # (n, K, d)
        ok = bool(xp.all(diagL > 0))  # CuPy may return NaN instead of raising
    except Exception as exc:  # numpy.linalg.LinAlgError, cupy's equivalent
        if "positive" not in str(exc).lower() and "linalg" not in type(exc).__name__.lower():
            raise
        ok = False
    if not ok:
        _raise_first_non_pd(T, row0)
    Linv = xp.linalg.inv(L)  # (n, K, d, d) lower triangular
    z = xp.einsum("nkij,nkj->nki", Linv, w)  # L^-1 w
    maha = xp.sum(z * z, axis=-1)  # (n, K)
    logdet = 2.0 * xp.sum(xp.log(diagL), axis=-1)  # (n, K)
    logN = -0.5 * (d * math.log(2.0 * math.pi) + logdet + maha)
    u = xp.einsum("nkji,nkj->nki", Linv, z)  # L^-T L^-1 w = T^-1 w
    Tinv = xp.einsum("nkli,nklj->nkij", Linv, Linv)  # L^-T L^-1
    return logN, u, Tinv


def _raise_first_non_pd(T, row0):
    """Locate the first non-positive-definite T_ij (row-major order) and raise."""
    xp = array_namespace(T)
    n, K = T.shape[:2]
    for i in range(n):
        for j in range(K):
            try:
                Lij = xp.linalg.cholesky(T[i, j])
                if not bool(xp.all(xp.diagonal(Lij) > 0)):
                    raise ValueError("non-positive pivot")
            except Exception:  # noqa: BLE001 - any failure of this one factorisation
                raise NotPositiveDefiniteError(row0 + i, j) from None
    raise NotPositiveDefiniteError(row0, None, "batched Cholesky failed")


def _logsumexp_rows(logp):
    """(n, K) -> (n,) log sum_j exp(logp_ij), robust to -inf entries."""
    xp = array_namespace(logp)
    mx = xp.max(logp, axis=1)
    mx = xp.where(xp.isfinite(mx), mx, 0.0)
    return mx + xp.log(xp.sum(xp.exp(logp - mx[:, None]), axis=1))


def _cast_params(x, log_weights, means, covs, R):
    xp = array_namespace(x)
    dt = x.dtype
    return (
        xp.asarray(log_weights, dtype=dt),
        xp.asarray(means, dtype=dt),
        xp.asarray(covs, dtype=dt),
        None if R is None else xp.asarray(R, dtype=dt),
    )


def pattern_logdens_ref(x, S, log_weights, means, covs, R=None, chunk_bytes=None):
    """log alpha_j + log N(x_i | R_i m_j, T_ij) for one missingness pattern.

    Parameters
    ----------
    x : (n, d), S : (n, d, d), log_weights : (K,), means : (K, d) or (K, D) with R,
    covs : (K, d, d) or (K, D, D) with R, R : (n, d, D) or None.

    Returns
    -------
    (n, K) array in float64.
    """
    xp = array_namespace(x, S)
    lw, m, V, R = _cast_params(x, log_weights, means, covs, R)
    n, d = x.shape
    K = m.shape[0]
    out = xp.empty((n, K), dtype=xp.float64)
    step = chunk_rows(K, max(d, m.shape[1]), x.dtype.itemsize, chunk_bytes)
    for s in range(0, n, step):
        e = min(n, s + step)
        Rc = None if R is None else R[s:e]
        logN, _, _ = _pair_terms(x[s:e], S[s:e], m, V, Rc, s)
        out[s:e] = xp.asarray(logN, dtype=xp.float64) + xp.asarray(lw, dtype=xp.float64)[None, :]
    return out


def pattern_stats_ref(
    x, S, rw, log_weights, means, covs, R=None, chunk_bytes=None, log_background=None
):
    """Sufficient statistics (DESIGN.md section 3) of one missingness pattern.

    Parameters
    ----------
    x : (n, d) float32/float64, S : (n, d, d), rw : (n,) float64 row weights,
    log_weights : (K,), means : (K, d) (or (K, D) with R), covs : (K, d, d) (or (K, D, D)),
    R : (n, d, D) or None, log_background : log density (weight included) of a uniform
    background component on these fields, or None (DESIGN.md 4d).

    Returns
    -------
    n_j : (K,), a : (K, d) or (K, D), C : (K, d, d) or (K, D, D), ll : float, W : float,
    n_bg : float (weighted background responsibilities; 0 without a background),
        accumulated in float64.
    """
    xp = array_namespace(x, S)
    f64 = xp.float64
    lw, m, V, R = _cast_params(x, log_weights, means, covs, R)
    n, d = x.shape
    K, Dp = m.shape
    nj = xp.zeros(K, dtype=f64)
    a = xp.zeros((K, Dp), dtype=f64)
    C = xp.zeros((K, Dp, Dp), dtype=f64)
    ll = 0.0
    n_bg = 0.0
    rw = xp.asarray(rw, dtype=f64)
    step = chunk_rows(K, max(d, Dp), x.dtype.itemsize, chunk_bytes)
    for s in range(0, n, step):
        e = min(n, s + step)
        logN, u, Tinv = _pair_terms(x[s:e], S[s:e], m, V, None if R is None else R[s:e], s)
        logp = xp.asarray(logN, dtype=f64) + xp.asarray(lw, dtype=f64)[None, :]
        lse = _logsumexp_rows(logp)  # (n,)
        if log_background is not None:
            lbg = float(log_background)
            top = xp.maximum(lse, lbg)
            lse = top + xp.log(xp.exp(lse - top) + xp.exp(lbg - top))
            n_bg += float(xp.sum(rw[s:e] * xp.exp(lbg - lse)))
        wr = xp.exp(logp - lse[:, None]) * rw[s:e, None]  # (n, K) weighted responsibilities
        u64 = xp.asarray(u, dtype=f64)
        G = u64[..., :, None] * u64[..., None, :] - xp.asarray(Tinv, dtype=f64)  # (n, K, d, d)
        nj += xp.sum(wr, axis=0)
        if R is None:
            a += xp.einsum("nk,nki->ki", wr, u64)
            C += xp.einsum("nk,nkij->kij", wr, G)
        else:
            R64 = xp.asarray(R[s:e], dtype=f64)
            a += xp.einsum("nk,nid,nki->kd", wr, R64, u64)
            C += xp.einsum("nk,nid,nkij,nje->kde", wr, R64, G, R64, optimize=True)
        ll += float(xp.sum(rw[s:e] * lse))
    return nj, a, C, ll, float(xp.sum(rw)), n_bg


def move_sums_from_logdens(ld, lse, rw, log_weights):
    """The split-and-merge sums of rows from their log densities (DESIGN.md 4c).

    Parameters
    ----------
    ld : (n, K) log alpha_j + log N_ij, finite (a zero weight as its stand-in ``PAD_LOGW``).
    lse : (n,) float64 log p(x_i), the background included.
    rw : (n,) row weights or None (all 1).  log_weights : (K,) the finite log weights of ld.

    Returns
    -------
    RR : (K, K) sum_i w_i r_ij r_ik;  sums : (len(MOVE_SUMS), K), the table's terms evaluated
    on arrays; float64, in the namespace of ``ld``.
    """
    xp = array_namespace(ld)
    f64 = xp.float64
    ld = xp.asarray(ld, dtype=f64)
    w = xp.ones(ld.shape[0], dtype=f64) if rw is None else xp.asarray(rw, dtype=f64)
    lr = ld - lse[:, None]
    r = xp.exp(lr)
    wr = w[:, None] * r
    ok = wr > 0.0
    names = {
        "lr": xp.where(ok, lr, 0.0),
        "lw": xp.log(xp.where(w > 0.0, w, 1.0))[:, None],
        "logn": xp.where(ok, ld - xp.asarray(log_weights, dtype=f64)[None, :], 0.0),
    }
    scope = {"__builtins__": {}, "log": xp.log, "exp": xp.exp}
    terms = [eval(f, scope, names) for _, f in algebra.MOVE_SUMS]  # the table's own expressions
    sums = [xp.sum(xp.where(ok, wr * t, 0.0), axis=0) for t in terms]
    RR = r.T @ wr
    return 0.5 * (RR + RR.T), xp.stack(sums)  # exactly symmetric, like the compiled kernel's


def pattern_moves_ref(
    x, S, rw, log_weights, means, covs, R=None, chunk_bytes=None, log_background=None
):
    """The split-and-merge sums (:func:`move_sums_from_logdens`) of one missingness pattern;
    arguments as in :func:`pattern_stats_ref` (``rw`` may be None). Returns (RR, sums)."""
    xp = array_namespace(x, S)
    f64 = xp.float64
    lw = xp.maximum(xp.asarray(log_weights, dtype=f64), PAD_LOGW)  # finite, like the kernels'
    n, d = x.shape
    K, Dp = means.shape
    RR = xp.zeros((K, K), dtype=f64)
    sums = xp.zeros((len(algebra.MOVE_SUMS), K), dtype=f64)
    step = chunk_rows(K, max(d, Dp), x.dtype.itemsize, chunk_bytes)
    for s in range(0, n, step):
        e = min(n, s + step)
        Rc = None if R is None else R[s:e]
        ld = pattern_logdens_ref(x[s:e], S[s:e], lw, means, covs, Rc, chunk_bytes)
        lse = _logsumexp_rows(ld)
        if log_background is not None:
            lse = xp.logaddexp(lse, float(log_background))
        RRc, sc = move_sums_from_logdens(ld, lse, None if rw is None else rw[s:e], lw)
        RR += RRc
        sums += sc
    return RR, sums

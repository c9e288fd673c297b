"""Per-row posteriors of the true values, array-namespace code (NumPy or CuPy), DESIGN.md 4a.

The posterior of row i's true value under component j is Gaussian, N(b_ij, B_ij); over the
components it is a MIXTURE with weights r_ij. This module computes, per missingness pattern, its
moment-matched mean and covariance and the per-component posteriors of the most probable
components, in forms that lose nothing whatever the ratio of prior to noise in each field. It is
the correctness oracle and the path for projections and for the rows the compiled kernel
hands back (see :mod:`._numba_posterior`).

- Observed fields (R = I on them), with Y = S T^-1 (no cancellation: in noise-whitened
  coordinates its terms are bounded):  b_o = x - Y w = x - S u, and the closed-form Joseph form
      B_oo = Y V_oo Y^T + (I - Y) S (I - Y)^T,
  because I - K = S T^-1 for the gain K = V T^-1. Both terms are positive semi-definite and
  each is small exactly when B is: ~S when the noise is small (Y ~ 0), ~V when the component is
  narrow (I - Y ~ 0). V - V T^-1 V (cancels when S << V, Gaia's 1e-17 against 1e3 deg^2),
  S - S T^-1 S (cancels when V << S) and V T^-1 S (terms ~sqrt(V_aa / V_bb) between fields of
  different V/S) each fail somewhere.
- Unobserved fields: through the prior's regression G = V_uo V_oo^-1 and conditional covariance
  C = V_uu - V_uo V_oo^-1 V_ou (from a Cholesky factor of V, so C is positive semi-definite by
  construction): b_u = m_u + V_uo u, B_uo = G B_oo, B_uu = C + G B_oo G^T.
- Projections R: y = R v is observed with prior covariance P = R V R^T, so B_y is the Joseph form
  above with P for V_oo; v = m + H (y - R m) + N (v - m) with H = V R^T P^-1 and N = I - H R,
  the second part independent of y, hence B = H B_y H^T + N V N^T (N enters squared, so its
  rounding error in the observed directions, ~eps, contributes ~eps^2 V). This is the Joseph
  form (I - K R) V (I - K R)^T + K S K^T with I - K R = N + H Y R derived in closed form.
- The mixture's moments are centred: cov = sum_j r_j (B_j + d_j d_j^T) with d_j = b_j - bbar
  computed from the small parts (d_o,j = -S (u_j - ubar)), never sum r b b^T - bbar bbar^T.
All in float64.
"""

from __future__ import annotations

from xd_dask.kernels._common import array_namespace
from xd_dask.kernels.reference import _pair_terms, chunk_rows

__all__ = ["background_split", "conditional_blocks", "joseph", "pattern_posterior_ref"]


def conditional_blocks(means, covs, obs, unobs):
    """The prior's regression of the unobserved fields on the observed ones, per component.

    Parameters
    ----------
    means : (K, D), covs : (K, D, D) float64; obs : (d,), unobs : (du,) index arrays.

    Returns
    -------
    m_u : (K, du), V_uo : (K, du, d), G : (K, du, d) = V_uo V_oo^-1,
    C : (K, du, du) = V_uu - V_uo V_oo^-1 V_ou, as L_uu L_uu^T from the Cholesky factor of V
    in (observed, unobserved) order (positive semi-definite by construction).
    """
    xp = array_namespace(means, covs)
    d = len(obs)
    perm = xp.asarray(list(obs) + list(unobs))
    Vp = covs[:, perm][:, :, perm]
    L = xp.linalg.cholesky(Vp)  # (K, D, D)
    L_oo, L_uo, L_uu = L[:, :d, :d], L[:, d:, :d], L[:, d:, d:]
    # G = L_uo L_oo^-1  <=>  L_oo^T G^T = L_uo^T
    G = xp.swapaxes(xp.linalg.solve(xp.swapaxes(L_oo, 1, 2), xp.swapaxes(L_uo, 1, 2)), 1, 2)
    C = L_uu @ xp.swapaxes(L_uu, 1, 2)
    return means[:, perm[d:]], Vp[:, d:, :d], G, C


def background_split(lse, log_background):
    """(g, r_bg): the Gaussian part's share of each row's density and the background's
    responsibility, from the rows' log sum_j alpha_j N_ij ``lse`` (n,)."""
    xp = array_namespace(lse)
    if log_background is None:
        return xp.ones_like(lse), xp.zeros_like(lse)
    lbg = float(log_background)
    total = xp.logaddexp(lse, lbg)
    return xp.exp(lse - total), xp.exp(lbg - total)


def _sym(A):
    xp = array_namespace(A)
    return 0.5 * (A + xp.swapaxes(A, -1, -2))


def _t(A):
    return array_namespace(A).swapaxes(A, -1, -2)


def joseph(S, Tinv, P):
    """B = Y P Y^T + (I - Y) S (I - Y)^T with Y = S T^-1: the posterior covariance of y observed
    as y + noise(S), prior covariance P, T = P + S. Broadcasts over leading axes; (..., d, d)."""
    xp = array_namespace(S, Tinv)
    Y = S @ Tinv
    IY = xp.eye(Y.shape[-1], dtype=Y.dtype) - Y
    return _sym(Y @ P @ _t(Y) + IY @ S @ _t(IY))


def _responsibilities(logN, log_weights):
    """(n, K) Gaussian-normalised responsibilities and (n,) log sum_j alpha_j N_ij."""
    xp = array_namespace(logN)
    logp = logN + log_weights[None, :]
    mx = xp.max(logp, axis=1)
    mx = xp.where(xp.isfinite(mx), mx, 0.0)
    e = xp.exp(logp - mx[:, None])
    tot = xp.sum(e, axis=1)
    return e / tot[:, None], mx + xp.log(tot)


def _moments_identity(x, S, lw, means, covs, obs, unobs, blocks, s0):
    """Chunk posterior for R = I on the observed fields: shift (n, d) (mean_o = x - shift),
    mean_u (n, du), cov (n, D, D) in local order, r (n, K), lse (n,), and per component the
    pieces the top-k output needs (u, Tinv)."""
    xp = array_namespace(x)
    m_o = means[:, obs]
    V_oo = covs[:, obs][:, :, obs]
    logN, u, Tinv = _pair_terms(x, S, m_o, V_oo, None, s0)
    r, lse = _responsibilities(logN, lw)
    Boo = joseph(S[:, None], Tinv, V_oo[None])  # (n, K, d, d)
    ub = xp.einsum("nk,nka->na", r, u)
    shift = xp.einsum("nab,nb->na", S, ub)
    e = u - ub[:, None, :]
    SE = xp.einsum("nab,nkb->nka", S, e)  # S e_j = -(b_o,j - bbar_o)
    n, d = x.shape
    du = len(unobs)
    cov = xp.empty((n, d + du, d + du), dtype=xp.float64)
    cov[:, :d, :d] = xp.einsum("nk,nkab->nab", r, Boo) + xp.einsum("nk,nka,nkb->nab", r, SE, SE)
    mean_u = xp.empty((n, du), dtype=xp.float64)
    if du:
        m_u, V_uo, G, C = blocks
        bu = m_u[None] + xp.einsum("kca,nka->nkc", V_uo, u)  # (n, K, du)
        mean_u = xp.einsum("nk,nkc->nc", r, bu)
        f = bu - mean_u[:, None, :]
        Buo = G[None] @ Boo  # (n, K, du, d)
        cov[:, d:, :d] = xp.einsum("nk,nkca->nca", r, Buo) - xp.einsum("nk,nkc,nka->nca", r, f, SE)
        cov[:, :d, d:] = xp.swapaxes(cov[:, d:, :d], 1, 2)
        Buu = C[None] + Buo @ _t(G)[None]
        cov[:, d:, d:] = xp.einsum("nk,nkcf->ncf", r, Buu) + xp.einsum("nk,nkc,nkf->ncf", r, f, f)
    return shift, mean_u, cov, r, lse, u, Tinv


def _component_identity(S, u, Tinv, covs, obs, blocks, du):
    """Gaussian posterior of one chosen component per row: (shift (n, d), mean_u (n, du),
    cov (n, D, D) local order). u (n, d), Tinv (n, d, d), covs (n, D, D): the chosen ones."""
    xp = array_namespace(S)
    n, d = u.shape
    V_oo = covs[:, obs][:, :, obs]
    Boo = joseph(S, Tinv, V_oo)
    cov = xp.empty((n, d + du, d + du), dtype=xp.float64)
    cov[:, :d, :d] = Boo
    mean_u = xp.empty((n, du), dtype=xp.float64)
    if du:
        m_u, V_uo, G, C = blocks  # already gathered per row: (n, du), (n, du, d), ...
        mean_u = m_u + xp.einsum("nca,na->nc", V_uo, u)
        Buo = G @ Boo
        cov[:, d:, :d] = Buo
        cov[:, :d, d:] = xp.swapaxes(Buo, 1, 2)
        cov[:, d:, d:] = C + Buo @ xp.swapaxes(G, 1, 2)
    return xp.einsum("nab,nb->na", S, u), mean_u, cov


def _moments_projected(x, S, R, lw, means, covs, s0):
    """Chunk posterior with projections: mean (n, D) (centred frame), cov (n, D, D), r, lse,
    and the per-component b (n, K, D), B (n, K, D, D) for the top-k output."""
    xp = array_namespace(x)
    logN, u, Tinv = _pair_terms(x, S, means, covs, R, s0)
    r, lse = _responsibilities(logN, lw)
    n, d = x.shape
    D = means.shape[1]
    VRt = xp.einsum("kde,nie->nkdi", covs, R)  # V R^T, (n, K, D, d)
    P = xp.einsum("nid,nkdj->nkij", R, VRt)  # R V R^T
    try:
        Pinv_RV = xp.linalg.solve(P, xp.swapaxes(VRt, -1, -2))  # P^-1 R V, (n, K, d, D)
    except Exception as exc:  # numpy.linalg.LinAlgError, cupy's equivalent
        raise ValueError(
            "posterior with projections needs R_i V_j R_i^T to be invertible (each R_i of full "
            f"row rank, at most D rows): {exc}"
        ) from None
    H = xp.swapaxes(Pinv_RV, -1, -2)  # V R^T P^-1, (n, K, D, d)
    By = joseph(S[:, None], Tinv, P)  # posterior covariance of y = R v
    N = xp.eye(D)[None, None] - H @ R[:, None]  # I - H R
    B = H @ By @ xp.swapaxes(H, -1, -2) + N @ covs[None] @ xp.swapaxes(N, -1, -2)
    b = means[None] + xp.einsum("nkdi,nki->nkd", VRt, u)
    bbar = xp.einsum("nk,nkd->nd", r, b)
    db = b - bbar[:, None, :]
    cov = xp.einsum("nk,nkde->nde", r, B + db[..., :, None] * db[..., None, :])
    return bbar, cov, r, lse, b, B


def pattern_posterior_ref(job) -> None:
    """Posterior of one missingness pattern (``job``: a :class:`xd_dask.kernels.driver.Block`
    with full parameters); writes the outputs ``job.out`` at its rows. Computed in float64 in
    chunks of ``job.chunk_bytes``."""
    xp = array_namespace(job.x, job.S)
    f64 = xp.float64
    x = xp.asarray(job.x, dtype=f64)
    S = xp.asarray(job.S, dtype=f64)
    lw = xp.asarray(job.log_weights, dtype=f64)
    means = xp.asarray(job.means, dtype=f64)
    covs = xp.asarray(job.covs, dtype=f64)
    R = None if job.R is None else xp.asarray(job.R, dtype=f64)
    n, d = x.shape
    K, D = means.shape
    out = job.out
    rows_all = xp.asarray(job.rows)
    cols = xp.asarray(job.cols)
    c = xp.asarray(job.centre, dtype=f64)
    if R is None:
        obs, unobs = list(job.cols[:d]), list(job.cols[d:])
        blocks = conditional_blocks(means, covs, obs, unobs) if unobs else None
    step = chunk_rows(K, D, 8, job.chunk_bytes)
    k_top = job.top_k
    for s in range(0, n, step):
        e = min(n, s + step)
        rows = rows_all[s:e]
        if R is None:
            shift, mean_u, cov, r, lse, u, Tinv = _moments_identity(
                x[s:e], S[s:e], lw, means, covs, obs, unobs, blocks, s
            )
            x0 = job.x0[rows[:, None], cols[None, :d]]
            mean = xp.concatenate([x0 - shift, mean_u + c[None, d:]], axis=1)
        else:
            bbar, cov, r, lse, b, B = _moments_projected(x[s:e], S[s:e], R[s:e], lw, means, covs, s)
            mean = bbar + c[None, :]
        g, rbg = background_split(lse, job.log_background)
        cov = _sym(cov)  # exactly symmetric, like the compiled kernel's
        out.mean[rows[:, None], cols[None, :]] = mean
        out.cov[rows[:, None, None], cols[None, :, None], cols[None, None, :]] = cov
        best = xp.argmax(r, axis=1)
        idx = xp.arange(e - s)
        out.map_component[rows] = best
        out.map_resp[rows] = r[idx, best] * g
        out.background_resp[rows] = rbg
        if out.resp is not None:
            out.resp[rows] = r * g[:, None]
        if not k_top:
            continue
        order = xp.argsort(-r, axis=1, kind="stable")[:, :k_top]  # (n, k): ties in index order
        for t in range(k_top):
            k = order[:, t]
            out.top_component[rows, t] = k
            out.top_resp[rows, t] = r[idx, k] * g
            if R is None:
                gathered = None
                if unobs:
                    gathered = tuple(a[k] for a in blocks)
                sh, mu_u, cv = _component_identity(
                    S[s:e], u[idx, k], Tinv[idx, k], covs[k], obs, gathered, len(unobs)
                )
                mt = xp.concatenate([x0 - sh, mu_u + c[None, d:]], axis=1)
            else:
                mt, cv = b[idx, k] + c[None, :], B[idx, k]
            out.top_mean[rows[:, None], t, cols[None, :]] = mt
            out.top_cov[rows[:, None, None], t, cols[None, :, None], cols[None, None, :]] = _sym(cv)

"""Validation of the kernels' inputs (issue 19: R is validated like S; issue 20: the compiled
per-row check agrees with the eigenvalue rule it replaces)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.mixtures import draw_noisy, random_params, random_spd
from xd_dask.estimator import XDGMM
from xd_dask.kernels import compute_stats, posterior
from xd_dask.kernels._validate import check_inputs
from xd_dask.model import XDModel
from xd_dask.params import Params


def _projected(n=80, d=2, D=3, K=2, seed=0):
    rng = np.random.default_rng(seed)
    w, m, V = random_params(rng, K, D)
    R = rng.normal(size=(n, d, D))
    X = np.einsum("nij,nj->ni", R, m[rng.integers(0, K, n)]) + rng.normal(size=(n, d))
    return X, random_spd(rng, n, d, scale=0.5), R, w, m, V


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_projection_is_refused_like_a_bad_noise_covariance(bad):
    """NaN (or inf) in R on an observed field: XDGMM.fit accepted such a row (with a finite
    log-density) before; now the kernels refuse it and name the row and the field."""
    X, S, R, w, m, V = _projected()
    R[17, 1, 2] = bad
    start = XDModel(Params(w, m, V))  # the fit's first kernel call sees R
    with pytest.raises(ValueError, match=r"row 17, column 1: R\[1, :\] is not finite"):
        XDGMM(n_components=2, init=start, max_iter=3).fit(X, S, R=R)
    with pytest.raises(ValueError, match=r"row 17, column 1"):
        compute_stats(X, S, Params(w, m, V), R=R)
    with pytest.raises(ValueError, match=r"row 17, column 1"):
        posterior(X, S, Params(w, m, V), R=R)
    # the row of R of a missing field is never used: NaN there is fine
    X[17, 1] = np.nan
    st = compute_stats(X, S, Params(w, m, V), R=R)
    assert np.isfinite(st.ll) and np.isfinite(st.C).all()


def test_projections_of_the_wrong_shape_are_refused():
    X, S, R, w, m, V = _projected()
    with pytest.raises(ValueError, match=r"R must have shape \(n_rows, d, D\) = \(80, 2, 3\)"):
        compute_stats(X, S, Params(w, m, V), R=R[:, :, :2])
    with pytest.raises(ValueError, match=r"R must have shape"):
        compute_stats(X, S, Params(w, m, V), R=R[:, 0])


def _eigen_rule(X, S, f32):
    """The rule the compiled check implements, by eigenvalues (the starting code's check):
    index of the first row whose observed block scaled by its largest variance has an
    eigenvalue below -1e-10 (float32: -1e-6), or -1."""
    tol = 1e-6 if f32 else 1e-10
    for i in range(X.shape[0]):
        o = ~np.isnan(X[i])
        B = S[i][np.ix_(o, o)].astype(np.float64)
        if np.linalg.eigvalsh(B / max(np.abs(np.diag(B)).max(), 1e-300))[0] < -tol:
            return i
    return -1


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_compiled_definiteness_check_agrees_with_eigenvalues(dtype):
    """Blocks whose smallest scaled eigenvalue is spread over [-1e-3, 1e-3] around the
    tolerance (and singular ones: zero-noise fields), with missing fields: the first row
    refused is the one the eigenvalue rule names."""
    rng = np.random.default_rng(3)
    n, d = 400, 5
    Q, _ = np.linalg.qr(rng.normal(size=(n, d, d)))
    ev = rng.uniform(0.5, 2.0, size=(n, d))
    ev[:, 0] = rng.choice([0.0, 1e-3, -1e-3, 1e-12, -1e-12, 1e-7, -1e-7, 1.0], size=n)
    S = np.einsum("nij,nj,nkj->nik", Q, ev, Q)
    S = 0.5 * (S + np.swapaxes(S, 1, 2))
    X = rng.normal(size=(n, d))
    X[rng.random((n, d)) < 0.2] = np.nan
    X[np.isnan(X).all(axis=1), 0] = 0.0
    Xd, Sd = X.astype(dtype), S.astype(dtype)
    w, m, V = np.array([1.0]), np.zeros((1, d)), np.eye(d)[None]
    for start in range(0, n, 40):  # several blocks, so several first rows
        Xs, Ss = Xd[start:], Sd[start:]
        want = _eigen_rule(Xs, Ss, dtype == np.float32)
        if want < 0:
            check_inputs(Xs, Ss, w, m, V)
            continue
        with pytest.raises(ValueError, match=rf"^row {want}: X_cov is not positive semi"):
            check_inputs(Xs, Ss, w, m, V)


def test_unobserved_entries_are_not_checked():
    """A missing field's row and column of S may hold anything (NaN, negative, asymmetric)."""
    rng = np.random.default_rng(4)
    w, m, V = random_params(rng, 2, 3)
    X, S, _, _ = draw_noisy(rng, w, m, V, 30)
    X[5, 2] = np.nan
    S[5, 2, :] = S[5, :, 2] = np.nan
    S[5, 2, 2] = -1.0
    check_inputs(X, S, w, m, V)
    S[6, 1, 0] += 1.0  # an observed asymmetry is still found
    with pytest.raises(ValueError, match=r"row 6, column 0: X_cov is not symmetric \(entry \[0, 1"):
        check_inputs(X, S, w, m, V)

"""The statistics kernel against a direct per-pair loop; per-row functions; bad input."""

from __future__ import annotations

import numpy as np
import pytest

from tests.mixtures import draw_noisy, loop_stats, random_params, random_spd
from xd_dask.kernels import (
    NotPositiveDefiniteError,
    SuffStats,
    compute_stats,
    log_component_densities,
    posterior,
    responsibilities,
    row_log_likelihood,
)
from xd_dask.kernels.reference import pattern_stats_ref
from xd_dask.params import Params

BACKENDS = ["reference", "auto"]


def _problem(seed, n=40, D=4, K=3, missing=0.0):
    rng = np.random.default_rng(seed)
    w, m, V = random_params(rng, K, D)
    X, S, _, _ = draw_noisy(rng, w, m, V, n)
    if missing:
        mask = rng.random(X.shape) < missing
        mask[np.arange(n), rng.integers(0, D, n)] = False  # every row keeps a field
        X[mask] = np.nan
    return rng, X, S, w, m, V


def _assert_stats_close(st: SuffStats, ref, rtol=1e-10):
    nj, a, C, ll, W = ref
    scale_a = np.abs(a).max()
    scale_C = np.abs(C).max()
    np.testing.assert_allclose(st.n, nj, rtol=rtol, atol=rtol * nj.max())
    np.testing.assert_allclose(st.a, a, rtol=rtol, atol=rtol * scale_a)
    np.testing.assert_allclose(st.C, C, rtol=rtol, atol=rtol * scale_C)
    assert st.ll == pytest.approx(ll, rel=rtol)
    assert st.W == pytest.approx(W, rel=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_stats_equal_direct_loop(backend, seed):
    _, X, S, w, m, V = _problem(seed)
    _assert_stats_close(
        compute_stats(X, S, Params(w, m, V), backend=backend), loop_stats(X, S, w, m, V)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_with_missing_fields_and_row_weights(backend):
    rng, X, S, w, m, V = _problem(2, n=60, D=5, K=4, missing=0.3)
    rw = rng.uniform(0.2, 3.0, size=X.shape[0])
    st = compute_stats(X, S, Params(w, m, V), row_weights=rw, backend=backend)
    _assert_stats_close(st, loop_stats(X, S, w, m, V, row_weights=rw))
    assert st.n_rows == X.shape[0]


def test_stats_with_projections_equal_direct_loop():
    rng = np.random.default_rng(3)
    n, d, D, K = 30, 2, 3, 3
    w, m, V = random_params(rng, K, D)
    R = rng.normal(size=(n, d, D))
    X = np.einsum("nij,nj->ni", R, m[rng.integers(0, K, n)]) + rng.normal(size=(n, d))
    S = random_spd(rng, n, d, scale=0.5)
    X[4, 1] = np.nan  # a missing field drops a row of R_i
    st = compute_stats(X, S, Params(w, m, V), R=R)
    _assert_stats_close(st, loop_stats(X, S, w, m, V, R=R))


def test_identity_projection_equals_no_projection():
    _, X, S, w, m, V = _problem(4, missing=0.2)
    R = np.broadcast_to(np.eye(X.shape[1]), (X.shape[0],) + (X.shape[1],) * 2).copy()
    a = compute_stats(X, S, Params(w, m, V), R=R)
    b = compute_stats(X, S, Params(w, m, V), backend="reference")
    np.testing.assert_allclose(a.C, b.C, rtol=1e-11, atol=1e-12 * np.abs(b.C).max())
    assert a.ll == pytest.approx(b.ll, rel=1e-12)


def test_chunking_does_not_change_the_result():
    _, X, S, w, m, V = _problem(5, n=50)
    big = compute_stats(X, S, Params(w, m, V), backend="reference")
    small = compute_stats(
        X, S, Params(w, m, V), backend="reference", chunk_bytes=1
    )  # one row per chunk
    np.testing.assert_allclose(small.C, big.C, rtol=1e-12, atol=1e-13 * np.abs(big.C).max())


def test_stats_add_like_one_block():
    _, X, S, w, m, V = _problem(6, n=50)
    whole = compute_stats(X, S, Params(w, m, V))
    parts = compute_stats(X[:17], S[:17], Params(w, m, V)) + compute_stats(
        X[17:], S[17:], Params(w, m, V)
    )
    np.testing.assert_allclose(parts.C, whole.C, rtol=1e-12, atol=1e-13 * np.abs(whole.C).max())
    assert parts.n_rows == 50 and sum([parts]) is parts


def test_per_row_functions_match_the_loop():
    from scipy.stats import multivariate_normal

    _, X, S, w, m, V = _problem(7, n=20, missing=0.25)
    lp = log_component_densities(X, S, Params(w, m, V))
    for i in range(X.shape[0]):
        o = ~np.isnan(X[i])
        for j in range(len(w)):
            ref = np.log(w[j]) + multivariate_normal.logpdf(
                X[i, o], m[j, o], V[j][np.ix_(o, o)] + S[i][np.ix_(o, o)]
            )
            assert lp[i, j] == pytest.approx(ref, rel=1e-11)
    r = responsibilities(X, S, Params(w, m, V))
    np.testing.assert_allclose(r.sum(axis=1), 1.0, rtol=1e-13)
    np.testing.assert_allclose(
        row_log_likelihood(X, S, Params(w, m, V)), np.logaddexp.reduce(lp, axis=1), rtol=1e-13
    )


def test_missing_field_loglike_equals_dimensions_dropped_by_hand():
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(8)
    w, m, V = random_params(rng, 2, 4)
    x = rng.normal(size=4)
    S = random_spd(rng, 1, 4)[0]
    X = x.copy()
    X[[1, 3]] = np.nan
    keep = [0, 2]
    by_hand = np.logaddexp.reduce(
        [
            np.log(w[j])
            + multivariate_normal.logpdf(x[keep], m[j, keep], (V[j] + S)[np.ix_(keep, keep)])
            for j in range(2)
        ]
    )
    assert row_log_likelihood(X[None], S[None], Params(w, m, V))[0] == pytest.approx(
        by_hand, rel=1e-12
    )


def test_posterior_single_component_closed_form():
    rng = np.random.default_rng(9)
    _, m, V = random_params(rng, 1, 3)
    S = random_spd(rng, 5, 3)
    X = rng.normal(size=(5, 3))
    mean, cov = posterior(X, S, Params(np.ones(1), m, V))
    for i in range(5):
        Vinv, Sinv = np.linalg.inv(V[0]), np.linalg.inv(S[i])
        P = np.linalg.inv(Vinv + Sinv)  # Gaussian conjugacy
        np.testing.assert_allclose(cov[i], P, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(mean[i], P @ (Vinv @ m[0] + Sinv @ X[i]), rtol=1e-9, atol=1e-12)


def test_posterior_of_missing_field_comes_from_the_prior_regression():
    rng = np.random.default_rng(10)
    _, m, V = random_params(rng, 1, 2)
    X = np.array([[np.nan, 0.7]])
    S = np.array([[[1.0, 0.0], [0.0, 1e-30]]])  # second field observed almost exactly
    mean, cov = posterior(X, S, Params(np.ones(1), m, V))
    # conditional of a Gaussian: E[v0 | v1 = 0.7]
    expect = m[0, 0] + V[0, 0, 1] / V[0, 1, 1] * (0.7 - m[0, 1])
    assert mean[0, 0] == pytest.approx(expect, rel=1e-8)
    assert cov[0, 1, 1] == pytest.approx(0.0, abs=1e-12)


def test_reference_kernel_is_array_namespace_code():
    """No ``np.`` on data in the reference kernel: it must run on any namespace (CuPy on GPUs)."""
    import inspect

    from xd_dask.kernels import reference

    src = inspect.getsource(reference)
    assert "import numpy" not in src and " np." not in src
    assert callable(pattern_stats_ref)


# ------------------------------------------------------------------------ bad input
def _good(n=6, D=3, K=2):
    rng = np.random.default_rng(11)
    w, m, V = random_params(rng, K, D)
    X, S, _, _ = draw_noisy(rng, w, m, V, n)
    return X, S, w, m, V


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda X, S: S.__setitem__((2, 1, 1), np.nan), r"row 2, column 1.*not finite"),
        (lambda X, S: S.__setitem__((3, 0, 0), np.inf), r"row 3, column 0.*not finite"),
        (lambda X, S: S.__setitem__((4, 2, 2), -1.0), r"row 4, column 2.*negative variance"),
        (lambda X, S: S.__setitem__((1, 0, 2), S[1, 0, 2] + 0.5), r"row 1.*not symmetric"),
        (lambda X, S: S.__setitem__(5, np.full((3, 3), 2.0) - np.eye(3)), r"row 5.*positive semi"),
        (lambda X, S: X.__setitem__(0, np.nan), r"row 0 has no observed field"),
        (lambda X, S: X.__setitem__((2, 1), np.inf), r"row 2, column 1.*infinite"),
    ],
)
def test_bad_input_names_row_and_column(mutate, match):
    X, S, w, m, V = _good()
    mutate(X, S)
    with pytest.raises(ValueError, match=match):
        compute_stats(X, S, Params(w, m, V))


def test_shape_mismatch_is_a_clear_error():
    X, S, w, m, V = _good()
    with pytest.raises(ValueError, match="X_cov must have shape"):
        compute_stats(X, S[:, :2, :2], Params(w, m, V))
    with pytest.raises(ValueError, match="X has 2 features but the model has 3"):
        compute_stats(X[:, :2], S[:, :2, :2], Params(w, m, V))
    with pytest.raises(ValueError, match="row weights must have shape"):
        compute_stats(X, S, Params(w, m, V), row_weights=np.ones(2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_positive_definite_T_names_row_and_component(backend):
    X, S, w, m, V = _good()
    V = V.copy()
    V[1] = -10.0 * np.eye(3)  # T = V_1 + S_i is negative definite for every row
    with pytest.raises(NotPositiveDefiniteError, match=r"row 0, component 1") as info:
        compute_stats(X, S, Params(w, m, V), backend=backend)
    assert (info.value.row, info.value.component) == (0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_background_with_missing_fields(backend):
    """A uniform background's density on each row is weight / (volume of the box over the row's
    observed fields); the dispatcher's statistics and per-row functions agree with a direct
    computation of the (K + 1)-column mixture."""
    from xd_dask.kernels import Background

    rng, X, S, w, m, V = _problem(3, n=80, D=4, K=3, missing=0.25)
    bg = Background(0.1, [-15.0, -10.0, -5.0, -25.0], [15.0, 10.0, 5.0, 25.0])
    w = 0.9 * np.asarray(w)
    st = compute_stats(X, S, Params(w, m, V, bg), backend=backend)
    logp = log_component_densities(X, S, Params(w, m, V), backend="reference")
    obs = ~np.isnan(X)
    lbg = np.log(0.1) - obs @ np.log([30.0, 20.0, 10.0, 50.0])
    full = np.concatenate([logp, lbg[:, None]], axis=1)
    mx = full.max(axis=1, keepdims=True)
    lse = (mx + np.log(np.exp(full - mx).sum(axis=1, keepdims=True)))[:, 0]
    r = np.exp(full - lse[:, None])
    np.testing.assert_allclose(st.n, r[:, :3].sum(axis=0), rtol=1e-10)
    assert st.n_bg == pytest.approx(r[:, 3].sum(), rel=1e-10)
    assert st.ll == pytest.approx(lse.sum(), rel=1e-12)
    np.testing.assert_allclose(
        row_log_likelihood(X, S, Params(w, m, V, bg), backend=backend), lse, rtol=1e-12
    )
    resp = responsibilities(X, S, Params(w, m, V, bg), backend=backend)
    np.testing.assert_allclose(resp.sum(axis=1), 1.0 - r[:, 3], rtol=1e-10)
    # A zero-weight background changes nothing.
    off = compute_stats(X, S, Params(w / 0.9, m, V, Background(0.0, bg.lo, bg.hi)), backend=backend)
    plain = compute_stats(X, S, Params(w / 0.9, m, V), backend=backend)
    assert off.ll == plain.ll and off.n_bg == 0.0

"""EM updates against the textbook form; online pooling; regularisation; collapse handling."""

from __future__ import annotations

import numpy as np
import pytest

from tests.mixtures import draw_noisy, random_params
from xd_dask.kernels import SuffStats, compute_stats
from xd_dask.optim.batch import batch_update
from xd_dask.optim.online import OnlineState, online_update, pool
from xd_dask.optim.schedule import StepSchedule
from xd_dask.params import Params


def _textbook_update(X, S, w, m, V):
    """Bovy et al. (2011) EM with b_ij = m_j + V_j T_ij^-1 w_ij, B_ij = V_j - V_j T_ij^-1 V_j."""
    n, D = X.shape
    K = len(w)
    logp = np.empty((n, K))
    for i in range(n):
        for j in range(K):
            T = V[j] + S[i]
            r = X[i] - m[j]
            logp[i, j] = np.log(w[j]) - 0.5 * (
                D * np.log(2 * np.pi) + np.linalg.slogdet(T)[1] + r @ np.linalg.solve(T, r)
            )
    q = np.exp(logp - np.logaddexp.reduce(logp, axis=1)[:, None])
    w2, m2, V2 = np.empty(K), np.empty((K, D)), np.empty((K, D, D))
    for j in range(K):
        b = np.empty((n, D))
        B = np.empty((n, D, D))
        for i in range(n):
            Tinv = np.linalg.inv(V[j] + S[i])
            b[i] = m[j] + V[j] @ Tinv @ (X[i] - m[j])
            B[i] = V[j] - V[j] @ Tinv @ V[j]
        qj = q[:, j].sum()
        w2[j] = qj / n
        m2[j] = (q[:, j, None] * b).sum(0) / qj
        d = b - m2[j]
        V2[j] = (q[:, j, None, None] * (d[:, :, None] * d[:, None, :] + B)).sum(0) / qj
    return w2, m2, V2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_centred_update_equals_textbook(seed):
    rng = np.random.default_rng(seed)
    w, m, V = random_params(rng, 3, 3)
    X, S, _, _ = draw_noisy(rng, w, m, V, 80)
    upd = batch_update(compute_stats(X, S, Params(w, m, V)), Params(w, m, V), reg_covar=0.0)
    w2, m2, V2 = _textbook_update(X, S, w, m, V)
    np.testing.assert_allclose(upd.params.weights, w2, rtol=1e-10)
    np.testing.assert_allclose(upd.params.means, m2, rtol=1e-10, atol=1e-10 * np.abs(m2).max())
    np.testing.assert_allclose(
        upd.params.covariances, V2, rtol=1e-10, atol=1e-10 * np.abs(V2).max()
    )
    assert upd.reseeded == []


def test_regularisation_forms():
    rng = np.random.default_rng(3)
    w, m, V = random_params(rng, 2, 3)
    X, S, _, _ = draw_noisy(rng, w, m, V, 50)
    st = compute_stats(X, S, Params(w, m, V))
    plain = batch_update(st, Params(w, m, V), reg_covar=0.0)
    add = batch_update(st, Params(w, m, V), reg_covar=0.3)
    np.testing.assert_allclose(
        add.params.covariances, plain.params.covariances + 0.3 * np.eye(3), rtol=1e-13
    )
    bw = batch_update(st, Params(w, m, V), reg_covar=0.3, reg_form="bovy_w")
    n = st.n[:, None, None]
    np.testing.assert_allclose(
        bw.params.covariances,
        (n * plain.params.covariances + 0.3 * np.eye(3)) / (n + 1),
        rtol=1e-13,
    )
    with pytest.raises(ValueError, match="reg_form"):
        batch_update(st, Params(w, m, V), reg_form="bogus")
    with pytest.raises(ValueError, match="reg_covar"):
        batch_update(st, Params(w, m, V), reg_covar=-1.0)


def test_online_step_one_on_all_rows_is_batch_em():
    rng = np.random.default_rng(4)
    w, m, V = random_params(rng, 3, 2)
    X, S, _, _ = draw_noisy(rng, w, m, V, 100)
    st = compute_stats(X, S, Params(w, m, V))
    b = batch_update(st, Params(w, m, V), reg_covar=1e-3)
    p = Params(w, m, V)
    state, o = online_update(OnlineState.from_params(p), st, p, 1.0, reg_covar=1e-3)
    np.testing.assert_allclose(o.params.weights, b.params.weights, rtol=1e-13)
    np.testing.assert_allclose(o.params.means, b.params.means, rtol=1e-13)
    np.testing.assert_allclose(o.params.covariances, b.params.covariances, rtol=1e-13)


def test_pooling_equals_moments_of_the_union():
    """Pooling two (weight, mean, covariance) triples = moments of the combined distribution."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(300, 2)), rng.normal(loc=2.0, size=(100, 2))
    tri = lambda z: (np.array([len(z) / 400]), z.mean(0)[None], np.cov(z.T, bias=True)[None])
    s1, m1, c1 = tri(a)
    s2, m2, c2 = tri(b)
    # weights (1-l) s1 and l s2 with l = 0.5 reproduce the union when s are row fractions
    st = pool(OnlineState(2 * s1, m1, c1), 2 * s2, m2, c2, 0.5)
    u = np.vstack([a, b])
    np.testing.assert_allclose(st.mu[0], u.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma[0], np.cov(u.T, bias=True), rtol=1e-12)


def test_collapsed_component_is_reseeded_never_nan():
    rng = np.random.default_rng(6)
    w, m, V = random_params(rng, 3, 2)
    X, S, _, _ = draw_noisy(rng, w[:2] / w[:2].sum(), m[:2], V[:2], 200)
    m = m.copy()
    m[2] = 1e3  # nowhere near the data: gets no responsibility at all
    st = compute_stats(X, S, Params(w, m, V))
    assert st.n[2] < 1e-100
    upd = batch_update(st, Params(w, m, V))
    assert upd.reseeded == [2]
    for arr in (upd.params.weights, upd.params.means, upd.params.covariances):
        assert np.all(np.isfinite(arr))
    assert upd.params.weights.sum() == pytest.approx(1.0)
    assert np.all(upd.params.weights > 0)
    np.linalg.cholesky(upd.params.covariances)
    # the split keeps the mixture's overall mean
    plain_mean = (st.n[:2] / st.W) @ batch_update(st, Params(w, m, V)).params.means[
        :2
    ]  # not the split one
    assert np.all(np.isfinite(plain_mean))
    mix_mean = upd.params.weights @ upd.params.means
    ok = ~np.isin(np.arange(3), upd.reseeded)
    assert mix_mean == pytest.approx(mix_mean)  # finite
    assert ok.sum() == 2


def test_step_schedules():
    p = StepSchedule("power", kappa=0.6, t0=1.0)
    assert p(0) == 1.0 and p(3) == pytest.approx(4**-0.6)
    h = StepSchedule("halving", lambda0=0.2, hold=10, every=5, floor=0.01)
    assert [h(0), h(9), h(10), h(14), h(15), h(1000)] == [0.2, 0.2, 0.1, 0.1, 0.05, 0.01]
    with pytest.raises(ValueError, match="kappa"):
        StepSchedule("power", kappa=0.4)
    with pytest.raises(ValueError, match="kind"):
        StepSchedule("cosine")


def test_mean_loglike_and_empty_stats():
    st = SuffStats.zeros(2, 3)
    assert np.isnan(st.mean_loglike)
    with pytest.raises(ValueError, match="no rows"):
        batch_update(st, Params(np.ones(2) / 2, np.zeros((2, 3)), np.stack([np.eye(3)] * 2)))

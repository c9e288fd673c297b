"""The posterior kernels (compiled and reference) against a per-pair numpy.linalg loop.

References (tests/posterior_refs.py): the textbook per-pair formulas in float64 (exact on these
well-scaled problems) and, where they cancel, the information form or long-double arithmetic.
Missing fields use two patterns (complete rows, rows with field 0 only) so that each dtype
compiles two small kernels (the 7-field kernels are exercised by test_posterior_gaia and the
distributed tests).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.mixtures import draw_noisy, random_params
from tests.posterior_refs import textbook_posterior
from xd_dask.kernels import Background, driver, posterior, registry, responsibilities
from xd_dask.kernels._posterior import ESCALATE
from xd_dask.params import Params

BACKENDS = ["numba", "reference"]


def _problem(K, seed, n=60, D=3):
    rng = np.random.default_rng(seed)
    w, m, V = random_params(rng, K, D)
    X, S, _, _ = draw_noisy(rng, w, m, V, n)
    X[: n // 3, 1:] = np.nan
    return X, S, w, m, V


def _err(mean, cov, want_mean, want_cov):
    """(mean error in posterior sd, covariance error in correlation units), worst entry."""
    sd = np.sqrt(np.diagonal(want_cov, axis1=1, axis2=2))
    cov_err = np.abs(cov - want_cov) / (sd[:, :, None] * sd[:, None, :])
    return float((np.abs(mean - want_mean) / sd).max()), float(cov_err.max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("K", [1, 5, 64])
def test_posterior_matches_per_pair_loop(K, dtype):
    X, S, w, m, V = _problem(K, seed=K)
    Xd, Sd = X.astype(dtype), S.astype(dtype)
    want_mean, want_cov = textbook_posterior(Xd, Sd, w, m, V)  # float64 on the rounded rows
    tol = 1e-9 if dtype == np.float64 else 2e-5
    got = {}
    for backend in BACKENDS:
        mean, cov = got[backend] = posterior(Xd, Sd, Params(w, m, V), backend=backend)
        assert mean.dtype == cov.dtype == np.float64
        mean_err, cov_err = _err(mean, cov, want_mean, want_cov)
        assert mean_err <= tol and cov_err <= tol, (backend, mean_err, cov_err)
        np.testing.assert_array_equal(cov, np.swapaxes(cov, 1, 2))
    mean_err, cov_err = _err(*got["numba"], *got["reference"])
    assert max(mean_err, cov_err) <= (1e-11 if dtype == np.float64 else 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_summary_map_and_top_k_components(backend):
    """The most probable component, all responsibilities and the top-3 components' own
    posteriors, each against the loop run on that component alone."""
    X, S, w, m, V = _problem(5, seed=11)
    post = posterior(
        X, S, Params(w, m, V), backend=backend, summary=True, top_k=3, return_resp=True
    )
    resp = responsibilities(X, S, Params(w, m, V), backend="reference")
    np.testing.assert_allclose(post.resp, resp, rtol=1e-10, atol=1e-14)
    assert np.array_equal(post.map_component, resp.argmax(axis=1))
    np.testing.assert_allclose(post.map_resp, resp.max(axis=1), rtol=1e-10)
    order = np.argsort(-resp, axis=1, kind="stable")[:, :3]
    assert np.array_equal(post.top_component, order)
    np.testing.assert_allclose(post.top_resp, np.take_along_axis(resp, order, 1), rtol=1e-10)
    assert post.background_resp is None
    for t in range(3):
        for k in range(5):
            rows = post.top_component[:, t] == k
            if not rows.any():
                continue
            want_mean, want_cov = textbook_posterior(
                X[rows], S[rows], [1.0], m[k : k + 1], V[k : k + 1]
            )
            mean_err, cov_err = _err(
                post.top_mean[rows, t], post.top_cov[rows, t], want_mean, want_cov
            )
            assert max(mean_err, cov_err) <= 1e-9, (t, k, mean_err, cov_err)
    mean, cov = posterior(X, S, Params(w, m, V), backend=backend)
    np.testing.assert_array_equal(post.mean, mean)  # the summary's moments are the default ones


@pytest.mark.parametrize("backend", BACKENDS)
def test_background_component(backend):
    """With a background component the moments are those of the Gaussian part; the
    responsibilities (and the background's) are the full ones."""
    X, S, w, m, V = _problem(5, seed=12)
    X[:4, :2] += 30.0  # far rows the background takes
    bg = Background(0.1, [-40.0] * 3, [40.0] * 3)
    post = posterior(
        X, S, Params(0.9 * w, m, V, bg), backend=backend, summary=True, return_resp=True
    )
    plain_mean, plain_cov = posterior(X, S, Params(w, m, V), backend=backend)
    np.testing.assert_allclose(post.mean, plain_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(post.cov, plain_cov, rtol=1e-12, atol=1e-12)
    want = responsibilities(X, S, Params(0.9 * w, m, V, bg), backend="reference")
    np.testing.assert_allclose(post.resp, want, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(post.background_resp, 1.0 - want.sum(axis=1), atol=1e-12)
    assert post.background_resp[:4].min() > 0.99 and np.median(post.background_resp) < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_noise_field(backend):
    """A field without noise (S singular) is known exactly: its posterior is the value with zero
    variance, and the other fields are conditioned on it."""
    X, S, w, m, V = _problem(5, seed=13)
    S[:10, 0, :] = S[:10, :, 0] = 0.0
    mean, cov = posterior(X, S, Params(w, m, V), backend=backend)
    assert np.array_equal(mean[:10, 0], X[:10, 0])
    assert not cov[:10, 0, :].any() and not cov[:10, :, 0].any()
    want_mean, want_cov = textbook_posterior(X, S, w, m, V)
    assert np.abs(mean - want_mean).max() <= 1e-12 * np.abs(want_mean).max()
    assert np.abs(cov - want_cov).max() <= 1e-12 * np.abs(want_cov).max()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rows_much_tighter_than_their_noise_are_recomputed(dtype, monkeypatch):
    """Rows of a component far narrower than their noise: S - S T^-1 S cancels there (relative
    error ~eps / q, q = posterior / noise variance), so such rows are recomputed (float32 -> the
    float64 kernel, float64 -> the Joseph form); the textbook form is exact here. Without the
    recomputation the same rows are off, so the test can fail."""
    rng = np.random.default_rng(14)
    n = 40
    narrow, tol = (1e-12, 1e-6) if dtype == np.float64 else (1e-4, 1e-5)
    w, m = np.array([0.5, 0.5]), np.array([[-30.0, 20.0], [3.0, -2.0]])
    V = np.stack([[[1.0, 0.3], [0.3, 0.5]], narrow * np.array([[2.0, -0.5], [-0.5, 1.0]])])
    S = np.tile([[1.0, 0.2], [0.2, 0.8]], (n, 1, 1)) * rng.uniform(0.5, 2.0, (n, 1, 1))
    X = m[1] + np.einsum("nij,nj->ni", np.linalg.cholesky(S), rng.normal(size=(n, 2)))
    Xd, Sd = X.astype(dtype), S.astype(dtype)
    want = textbook_posterior(Xd, Sd, w, m, V)
    assert max(_err(*posterior(Xd, Sd, Params(w, m, V), backend="numba"), *want)) <= tol
    monkeypatch.setitem(ESCALATE, np.dtype(dtype), 0.0)
    assert max(_err(*posterior(Xd, Sd, Params(w, m, V), backend="numba"), *want)) > 10 * tol


def _inv_ld(A):
    """Inverse of a small matrix in long double (Gauss-Jordan with partial pivoting)."""
    n = len(A)
    M = np.concatenate([A.astype(np.longdouble), np.eye(n, dtype=np.longdouble)], axis=1)
    for c in range(n):
        p = c + int(np.argmax(np.abs(M[c:, c])))
        M[[c, p]] = M[[p, c]]
        M[c] /= M[c, c]
        for r in range(n):
            if r != c:
                M[r] -= M[r, c] * M[c]
    return M[:, n:]


def _longdouble_info_form(X, S, w, m, V, R):
    """Posterior with projections from the information form in long double:
    B = (V^-1 + R^T S^-1 R)^-1, b = B (V^-1 m + R^T S^-1 x) (S invertible)."""
    ld = np.longdouble
    X, S, R, m, V = (np.asarray(a, ld) for a in (X, S, R, m, V))
    n, K, D = X.shape[0], len(w), m.shape[1]
    means, covs = np.empty((n, D), ld), np.empty((n, D, D), ld)
    for i in range(n):
        Si = _inv_ld(S[i])
        logp, bs, Bs = np.empty(K, ld), np.empty((K, D), ld), np.empty((K, D, D), ld)
        for j in range(K):
            T = R[i] @ V[j] @ R[i].T + S[i]
            r = X[i] - R[i] @ m[j]
            logdet = np.linalg.slogdet(T.astype(np.float64))[1]  # the weights need less
            logp[j] = np.log(ld(w[j])) - 0.5 * (logdet + r @ _inv_ld(T) @ r)
            Vi = _inv_ld(V[j])
            Bs[j] = _inv_ld(Vi + R[i].T @ Si @ R[i])
            bs[j] = Bs[j] @ (Vi @ m[j] + R[i].T @ Si @ X[i])
        p = np.exp(logp - logp.max())
        p /= p.sum()
        means[i] = p @ bs
        dev = bs - means[i]
        covs[i] = np.einsum("k,kab->ab", p, Bs) + np.einsum("k,ka,kb->ab", p, dev, dev)
    return means.astype(np.float64), covs.astype(np.float64)


@pytest.mark.skipif(np.finfo(np.longdouble).eps > 1e-18, reason="long double is double here")
def test_projected_posterior_is_stable():
    """Projections with noise 1e-12 of the prior. Square mixing R (every direction observed):
    the reference's form equals the information form in long double (which agrees with a
    50-digit computation to 1e-12 here), float64 textbook formulas do not.
    Selection rows as R: equal to the missing-field path (exact, see test_posterior_gaia)."""
    rng = np.random.default_rng(15)
    n, K, D = 30, 3, 3
    w, m, V = random_params(rng, K, D)
    v = m[rng.integers(0, K, n)] + rng.normal(size=(n, D))
    R = rng.normal(size=(n, D, D))
    S = np.tile(np.array([[1.0, 0.3, 0.0], [0.3, 2.0, 0.1], [0.0, 0.1, 1.0]]), (n, 1, 1)) * 1e-12
    X = np.einsum("nid,nd->ni", R, v) + 1e-6 * rng.normal(size=(n, D))
    want = _longdouble_info_form(X, S, w, m, V, R)
    mean, cov = posterior(X, S, Params(w, m, V), R=R)
    assert np.all(np.linalg.eigvalsh(cov) > 0)
    assert max(_err(mean, cov, *want)) <= 1e-6
    assert max(_err(*textbook_posterior(X, S, w, m, V, R), *want)) > 1e-3
    # selection rows: fields 0 and 1 observed, 2 not
    sel = np.broadcast_to(np.eye(D)[:2], (n, 2, D))
    Xs, Ss = v[:, :2] + 1e-6 * rng.normal(size=(n, 2)), S[:, :2, :2]
    Xnan = np.concatenate([Xs, np.full((n, 1), np.nan)], axis=1)
    Snan = np.zeros((n, D, D))
    Snan[:, :2, :2] = Ss
    want = posterior(Xnan, Snan, Params(w, m, V), backend="reference")
    assert max(_err(*posterior(Xs, Ss, Params(w, m, V), R=sel), *want)) <= 1e-6
    assert max(_err(*textbook_posterior(Xs, Ss, w, m, V, sel), *want)) > 1e-5
    # identity rows equal no projection
    eye = np.broadcast_to(np.eye(D), (n, D, D))
    Xi, Si = v + 0.1 * rng.normal(size=(n, D)), np.tile(0.01 * np.eye(D), (n, 1, 1))
    for a, b in zip(
        posterior(Xi, Si, Params(w, m, V), R=eye), posterior(Xi, Si, Params(w, m, V)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_backend_choice_and_registry(monkeypatch):
    X, S, w, m, V = _problem(2, seed=16, n=10)
    R = np.broadcast_to(np.eye(3), (10, 3, 3))
    assert registry.resolve("posterior", "auto", X, None) == "numba"
    assert registry.resolve("posterior", "auto", X, R) == "reference"
    # the kernels read no environment: a backend is named by the caller (fit.backend)
    monkeypatch.setenv("XD_DASK_BACKEND", "reference")
    assert registry.resolve("posterior", "auto", X, None) == "numba"
    with pytest.raises(ValueError, match="does not take projections"):
        posterior(X, S, Params(w, m, V), R=R, backend="numba")
    with pytest.raises(ValueError, match="backend must be one of"):
        posterior(X, S, Params(w, m, V), backend="gpu")
    with pytest.raises(ValueError, match="top_k needs summary"):
        posterior(X, S, Params(w, m, V), top_k=2)
    # A new backend is one registration away, with no change to the driver.
    calls = []

    def spy():
        ref = registry.implementation("posterior", "reference")
        return lambda block: calls.append(len(block.rows)) or ref(block)

    monkeypatch.setitem(
        registry._BACKENDS, "spy", registry.Backend("spy", frozenset({"numpy"}), False)
    )
    monkeypatch.setitem(registry._IMPLS, ("posterior", "spy"), spy)
    mean, _ = posterior(X, S, Params(w, m, V), backend="spy")
    assert sorted(calls) == [3, 7]  # one call per missingness pattern
    np.testing.assert_array_equal(mean, posterior(X, S, Params(w, m, V), backend="reference")[0])


def test_auto_weighs_compiling_against_the_reference(monkeypatch):
    """ "auto" runs a pattern on the reference while the reference's estimated time stays below
    what the compiled variant needs before it can run (0 once loaded), accumulated per variant:
    a call too small to amortise a compile never pays for one, and a long series of small calls
    compiles once the time spent on the reference reaches the compile time."""
    X, S, w, m, V = _problem(2, seed=16, n=10)  # patterns of 3 and 7 rows, K = 2
    monkeypatch.setattr(driver, "_rent", {})
    monkeypatch.setattr(driver, "_ref_rate", {"posterior": 1e-3})  # 1 ms per pair
    calls = []

    def spy(seconds):
        ref = registry.implementation("posterior", "reference")
        run = lambda block: calls.append(len(block.rows)) or ref(block)  # noqa: E731
        run.readiness = lambda block: (len(block.rows), seconds)
        return run

    for seconds, want in ((0.0, [3, 7]), (1.0, []), (0.01, [7])):
        calls.clear()
        driver._rent.clear()
        monkeypatch.setitem(registry._LOADED, ("posterior", "numba"), spy(seconds))
        mean, _ = posterior(X, S, Params(w, m, V))  # 6 ms and 14 ms on the reference
        assert sorted(calls) == want, seconds
        np.testing.assert_allclose(mean, posterior(X, S, Params(w, m, V), backend="reference")[0])
    # the rent adds up per variant: at 20 ms, the 7-row pattern (14 ms a call) compiles at its
    # second call, the 3-row one (6 ms) at its fourth
    driver._rent.clear()
    monkeypatch.setitem(registry._LOADED, ("posterior", "numba"), spy(0.02))
    rounds = []
    for _ in range(4):
        calls.clear()
        posterior(X, S, Params(w, m, V))
        rounds.append(sorted(calls))
    assert rounds == [[], [7], [7], [3, 7]]
    assert posterior(X, S, Params(w, m, V), backend="numba")[0].shape == (10, 3)


def test_reference_posterior_is_array_namespace_code():
    import inspect

    from xd_dask.kernels import reference_posterior

    src = inspect.getsource(reference_posterior)
    assert "import numpy" not in src and " np." not in src

"""The CuPy path: the same reference kernel on device arrays. Skipped without CuPy or a device."""

from __future__ import annotations

import numpy as np
import pytest

from tests.mixtures import draw_noisy, loop_stats, random_params

cupy = pytest.importorskip("cupy")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cupy.is_available(), reason="no CUDA device"),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cupy_stats_equal_numpy_loop(dtype):
    from xd_dask.kernels import compute_stats

    rng = np.random.default_rng(0)
    w, m, V = random_params(rng, 4, 3)
    X, S, _, _ = draw_noisy(rng, w, m, V, 200)
    X[3, 1] = np.nan
    st = compute_stats(cupy.asarray(X.astype(dtype)), cupy.asarray(S.astype(dtype)), w, m, V)
    assert isinstance(st.C, np.ndarray)  # statistics come back to the host
    nj, a, C, ll, W = loop_stats(X, S, w, m, V)
    rtol = 1e-10 if dtype == np.float64 else 1e-3
    np.testing.assert_allclose(st.n, nj, rtol=rtol, atol=rtol * nj.max())
    np.testing.assert_allclose(st.C, C, rtol=rtol, atol=rtol * np.abs(C).max())
    assert st.ll == pytest.approx(ll, rel=rtol)


def test_cupy_posterior_equals_numpy():
    from xd_dask.kernels import posterior

    rng = np.random.default_rng(1)
    w, m, V = random_params(rng, 3, 3)
    X, S, _, _ = draw_noisy(rng, w, m, V, 100)
    mean_h, cov_h = posterior(X, S, w, m, V)
    mean_d, cov_d = posterior(cupy.asarray(X), cupy.asarray(S), w, m, V)
    np.testing.assert_allclose(cupy.asnumpy(mean_d), mean_h, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cupy.asnumpy(cov_d), cov_h, rtol=1e-10, atol=1e-12)

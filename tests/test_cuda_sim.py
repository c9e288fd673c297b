"""The numba.cuda kernels run by the CUDA simulator (no GPU), against the CPU kernels and a
per-pair numpy.linalg loop.

Each group runs in a subprocess with ``NUMBA_ENABLE_CUDASIM=1`` (the simulator replaces
``numba.cuda`` for the whole process; compile_ptx, tested in test_cuda_ptx.py, is unavailable
inside it). Every simulated CUDA thread is a Python thread, so the rows are few (tens) and
``sys.setswitchinterval(1e-4)`` speeds up block synchronisation. The launch parameters are
shrunk (``rows_per_block``, ``max_block``, ``threads``) so that several blocks, the fused kernel
and the two-pass K-tiled kernels all run. The dispatcher is reached through a backend registered
here for NumPy arrays ("cudasim", the same loaders as the "cuda" backend), with the noise
covariances passed as packed lower triangles, the GPU workers' layout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from xd_dask.params import Params

pytest.importorskip("numba.cuda")

GROUPS = ("stats", "projected", "dispatch", "nonpd", "moves")


@pytest.mark.parametrize("group", GROUPS)
def test_cuda_kernels_in_the_simulator(group):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, __file__, group], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{group}: ok" in res.stdout, res.stdout
    print(res.stdout.strip(), f"({time.perf_counter() - t0:.1f} s)")


# --------------------------------------------------------------------------- the subprocess
def _err(got, want) -> float:
    """Normwise relative error over the statistics (n_j, a, C, ll, W[, n_bg]); NaN counts as
    an infinite error (``max`` would drop it)."""
    e = 0.0
    for g, w in zip(got, want, strict=False):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (g.shape, w.shape)
        d = float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-300))
        e = max(e, d if d == d else np.inf)
    return e


TOL = {np.float64: 1e-10, np.float32: 2e-5}


def _stats_cases():
    from tests.mixtures import loop_stats
    from tests.test_kernel_numba import make_problem
    from xd_dask.kernels._cuda import pack_lower, pattern_logdens_cuda, pattern_stats_cuda
    from xd_dask.kernels._numba import pattern_logdens_numba, pattern_stats_numba

    # (d, K, dtype, launch): fused with several row blocks, and two passes with K tiles
    fused = {"min_block": 1, "rows_per_block": 16}
    two = {"max_block": 2, "rows_per_block": 16, "threads": 4}
    cases = [
        (1, 1, np.float64, fused), (1, 5, np.float32, two), (2, 5, np.float64, fused),
        (2, 16, np.float32, fused), (3, 16, np.float64, two), (3, 1, np.float32, fused),
        (7, 5, np.float64, fused), (7, 16, np.float32, two), (7, 1, np.float64, two),
    ]  # fmt: skip
    for d, K, dt, launch in cases:
        x, S, rw, lw, m, V = make_problem(40, d, K, seed=10 * d + K)
        x, S = x.astype(dt), S.astype(dt)
        packed = d > 1 and K != 16  # both layouts of S
        got = pattern_stats_cuda(x, pack_lower(S) if packed else S, rw, lw, m, V, **launch)
        cpu = pattern_stats_numba(x, S, rw, lw, m, V)
        loop = loop_stats(x.astype(np.float64), S.astype(np.float64), np.exp(lw), m, V, rw)
        e_cpu, e_loop = _err(got, cpu[:5]), _err(got[:5], loop)
        assert e_cpu <= TOL[dt] and e_loop <= TOL[dt] * (1 if dt == np.float64 else 5), (
            d, K, dt, e_cpu, e_loop,
        )  # fmt: skip
        ld = pattern_logdens_cuda(x, S, lw, m, V, threads=32)
        e_ld = float(np.max(np.abs(ld - pattern_logdens_numba(x, S, lw, m, V))))
        assert e_ld <= (1e-11 if dt == np.float64 else 1e-3), (d, K, dt, e_ld)
        print(f"stats d={d} K={K} {np.dtype(dt).name}: cpu {e_cpu:.1e} loop {e_loop:.1e} "
              f"logdens {e_ld:.1e}")  # fmt: skip
    # a background component, fused and two passes
    x, S, rw, lw, m, V = make_problem(40, 2, 5, seed=3)
    for launch in (fused, two):
        got = pattern_stats_cuda(x, S, rw, lw, m, V, -9.0, **launch)
        assert _err(got, pattern_stats_numba(x, S, rw, lw, m, V, -9.0)) <= 1e-10
        assert got[5] > 0.0


def _projected_cases():
    from tests.mixtures import loop_stats
    from tests.test_kernel_projected import problem
    from xd_dask.kernels._cuda import pattern_logdens_cuda, pattern_stats_cuda
    from xd_dask.kernels._numba import pattern_logdens_numba, pattern_stats_numba

    cases = [
        (2, 3, 5, np.float64, {"min_block": 1, "rows_per_block": 16}),
        (2, 3, 16, np.float32, {"max_block": 4, "rows_per_block": 16, "threads": 8}),
        (1, 3, 5, np.float32, {"min_block": 1, "rows_per_block": 16}),
        (3, 7, 5, np.float64, {"max_block": 2, "rows_per_block": 16, "threads": 4}),
    ]
    for d, D, K, dt, launch in cases:
        x, S, R, rw, w, m, V = problem(36, d, D, K, seed=d + D + K)
        x, S, R = x.astype(dt), S.astype(dt), R.astype(dt)
        lw = np.log(w)
        got = pattern_stats_cuda(x, S, rw, lw, m, V, R=R, **launch)
        cpu = pattern_stats_numba(x, S, rw, lw, m, V, R=R)
        loop = loop_stats(*(a.astype(np.float64) for a in (x, S)), w, m, V, rw, R.astype(float))
        e_cpu, e_loop = _err(got, cpu[:5]), _err(got[:5], loop)
        assert e_cpu <= TOL[dt] and e_loop <= 5 * TOL[dt], (d, D, K, dt, e_cpu, e_loop)
        ld = pattern_logdens_cuda(x, S, lw, m, V, R=R, threads=32)
        e_ld = float(np.max(np.abs(ld - pattern_logdens_numba(x, S, lw, m, V, R=R))))
        assert e_ld <= (1e-11 if dt == np.float64 else 1e-3), (d, D, K, dt, e_ld)
        print(f"projected d={d} D={D} K={K} {np.dtype(dt).name}: cpu {e_cpu:.1e} "
              f"loop {e_loop:.1e} logdens {e_ld:.1e}")  # fmt: skip


def _register_sim_backend():
    """A backend for NumPy arrays with the CUDA kernels (the simulator takes NumPy arrays)."""
    from xd_dask.kernels import _builtin, registry

    registry.register_backend("cudasim", namespaces=("numpy",), projections=True, packed=True)
    registry.register("stats", "cudasim", _builtin._cuda_stats)
    registry.register("logdens", "cudasim", _builtin._cuda_logdens)
    registry.register("posterior", "cudasim", _builtin._cuda_posterior)
    registry.register("moves", "cudasim", _builtin._cuda_moves)


def _missing_problem(seed, n, D, K, missing, dt):
    from tests.mixtures import draw_noisy, random_params

    rng = np.random.default_rng(seed)
    w, m, V = random_params(rng, K, D)
    X, S, _, _ = draw_noisy(rng, w, m, V, n)
    mask = rng.random(X.shape) < missing
    mask[np.arange(n), rng.integers(0, D, n)] = False
    X[mask] = np.nan
    return X.astype(dt), S.astype(dt), w, m, V


def _dispatch_cases():
    from tests.mixtures import loop_stats
    from xd_dask.kernels import compute_stats, log_component_densities, posterior
    from xd_dask.kernels._cuda import pack_lower

    _register_sim_backend()
    for dt in (np.float64, np.float32):
        X, S, w, m, V = _missing_problem(4, 45, 3, 5, 0.3, dt)
        Sp = pack_lower(S)
        st = compute_stats(X, Sp, Params(w, m, V), backend="cudasim")
        want = loop_stats(X.astype(float), S.astype(float), w, m, V)
        e = _err((st.n, st.a, st.C, st.ll, st.W), want)
        assert e <= TOL[dt] * 5, (dt, e)
        ld = log_component_densities(X, Sp, Params(w, m, V), backend="cudasim")
        ref = log_component_densities(X, S, Params(w, m, V), backend="reference")
        e_ld = float(np.max(np.abs(ld - ref)))
        assert e_ld <= (1e-11 if dt == np.float64 else 1e-3), (dt, e_ld)
        got = posterior(X, Sp, Params(w, m, V), backend="cudasim", summary=True, return_resp=True)
        ref = posterior(X, S, Params(w, m, V), backend="reference", summary=True, return_resp=True)
        ptol = 1e-10 if dt == np.float64 else 1e-5
        for f in ("mean", "cov", "map_resp", "resp"):
            a, b = getattr(got, f), getattr(ref, f)
            scale = np.max(np.abs(b))
            assert np.max(np.abs(a - b)) <= ptol * scale, (f, dt, np.max(np.abs(a - b)))
        np.testing.assert_array_equal(got.map_component, ref.map_component)
        print(f"dispatch missing fields {np.dtype(dt).name}: stats {e:.1e} logdens {e_ld:.1e}")
    # the posterior with a background and unobserved fields, float64
    from xd_dask.kernels import Background

    X, S, w, m, V = _missing_problem(5, 30, 4, 3, 0.3, np.float64)
    bg = Background(0.1, (-20.0,) * 4, (20.0,) * 4)
    got = posterior(X, S, Params(w, m, V, bg), backend="cudasim", summary=True)
    ref = posterior(X, S, Params(w, m, V, bg), backend="reference", summary=True)
    for f in ("mean", "cov", "background_resp", "map_resp"):
        np.testing.assert_allclose(getattr(got, f), getattr(ref, f), rtol=1e-9, atol=1e-12)


def _moves_cases():
    """The split-and-merge sums on the device against the per-pair loop and the CPU kernel:
    missing fields, row weights and a background through the driver (packed noise), the two
    ways rows are chunked, projections, float32."""
    from tests.test_kernel_moves import loop_moves
    from tests.test_kernel_projected import problem
    from xd_dask.kernels import Background, move_sums
    from xd_dask.kernels._cuda import pack_lower, pattern_moves_cuda
    from xd_dask.kernels._numba import pattern_moves_numba

    _register_sim_backend()
    rng = np.random.default_rng(7)
    for dt in (np.float64, np.float32):
        X, S, w, m, V = _missing_problem(8, 40, 3, 4, 0.3, dt)
        rw = rng.uniform(0.5, 2.0, X.shape[0])
        bg = Background(0.1, (-20.0,) * 3, (20.0,) * 3)
        p = Params(0.9 * w, m, V, bg)
        got = move_sums(X, pack_lower(S), p, row_weights=rw, backend="cudasim")
        want = loop_moves(X.astype(float), S.astype(float), 0.9 * w, m, V, rw,
                          lbg=lambda o: np.log(0.1) - o.sum() * np.log(40.0))  # fmt: skip
        e = _err((got.RR, got["n"], got["flogf"], got["flogp"]), want)
        assert e <= TOL[dt] * 5, (dt, e)
        print(f"moves dispatch {np.dtype(dt).name}: loop {e:.1e}")
    x, S, R, rw, w, m, V = problem(36, 2, 3, 5, seed=11)
    lw = np.log(w)
    for launch in ({"threads": 8}, {"threads": 4, "chunk_pairs": 40}):  # one chunk, several
        got = pattern_moves_cuda(x, S, rw, lw, m, V, -6.0, R, **launch)
        cpu = pattern_moves_numba(x, S, rw, lw, m, V, -6.0, R)
        e = _err(got, cpu)
        assert e <= 1e-10, (launch, e)
        print(f"moves projected {launch}: cpu {e:.1e}")


def _nonpd_cases():
    from tests.test_kernel_numba import _non_pd_problem
    from xd_dask.kernels import NotPositiveDefiniteError, posterior
    from xd_dask.kernels._cuda import pattern_logdens_cuda, pattern_stats_cuda

    # rows 200.. make T[1] (and from 250 T[3]) indefinite; keep 180 rows around the first one
    x, S, rw, lw, m, V = _non_pd_problem()
    sel = slice(170, 260)
    x, S, rw = x[sel], S[sel], rw[sel]
    fused = {"min_block": 1, "rows_per_block": 16}
    two = {"max_block": 2, "rows_per_block": 16, "threads": 4}
    for dt in (np.float64, np.float32):
        xs, Ss = x.astype(dt), S.astype(dt)
        for fn, args, kw in (
            (pattern_stats_cuda, (rw, lw, m, V), fused),
            (pattern_stats_cuda, (rw, lw, m, V), two),
            (pattern_logdens_cuda, (lw, m, V), {"threads": 32}),
        ):
            try:
                fn(xs, Ss, *args, **kw)
            except NotPositiveDefiniteError as err:
                assert (err.row, err.component) == (30, 1), (err.row, err.component)
            else:
                raise AssertionError("no NotPositiveDefiniteError")
    _register_sim_backend()
    w = np.exp(lw)
    try:
        posterior(x, S, Params(w, m, V), backend="cudasim", check=False)
    except NotPositiveDefiniteError as err:
        assert (err.row, err.component) == (30, 1), (err.row, err.component)
    else:
        raise AssertionError("no NotPositiveDefiniteError from the posterior")
    V[1, 2, 2] = 1.0  # only component 3 is bad now, from local row 80
    try:
        pattern_stats_cuda(x, S, rw, lw, m, V, **fused)
    except NotPositiveDefiniteError as err:
        assert (err.row, err.component) == (80, 3), (err.row, err.component)
    print("non-PD rows and components: fused, two-pass, logdens, posterior agree")


def _atomic_shared_arrays() -> None:
    """One ``cuda.shared.array`` per launch and call site, whatever the thread interleaving,
    filled with NaN.

    numba-cuda's simulator (0.30.4, ``FakeCUDAShared.array``) looks the array up in a dict
    shared by the block's threads and, on a miss, inserts a fresh ``np.empty`` without a lock:
    two threads that both miss get two arrays, and a thread then reads slots only written in
    the other one as uninitialised memory (a statistic of 2.4e307 in one suite run; about one
    launch in 5000 of 8 threads at the switch interval used here). The lookup here is locked;
    NaN makes a read of a slot no thread wrote visible, as uninitialised shared memory would be
    on a device.
    """
    import threading

    from numba.cuda.simulator import kernelapi

    lock = threading.Lock()
    array = kernelapi.FakeCUDAShared.array

    def shared_array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory: one buffer, no race
            return array(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)  # the simulator's key
        with lock:
            res = self._allocations.get(key)
            if res is None:
                if isinstance(dtype, kernelapi.types.Type):
                    dtype = kernelapi.numpy_support.as_dtype(dtype)
                res = self._allocations[key] = np.full(shape, np.nan, dtype)
        return res

    kernelapi.FakeCUDAShared.array = shared_array


def _check_shared_arrays() -> None:
    """The threads of a block see one shared array even when a miss in the simulator's lookup
    is slow (without :func:`_atomic_shared_arrays` most launches here see two)."""
    from numba import cuda, float64
    from numba.cuda.simulator import kernelapi

    class SlowMiss(dict):
        def get(self, key, default=None):
            res = super().get(key, default)
            time.sleep(0.002 if res is None else 0.0)
            return res

    ns = {"cuda": cuda, "float64": float64}  # the simulator swaps the kernel's global cuda
    exec(
        "def neighbour(out):\n"
        "    j = cuda.threadIdx.x\n"
        "    sm = cuda.shared.array(8, float64)\n"
        "    sm[j] = j + 1.0\n"
        "    cuda.syncthreads()\n"
        "    out[j] = sm[(j + 1) % 8]\n",
        ns,
    )
    neighbour = cuda.jit(ns["neighbour"])

    init = kernelapi.FakeCUDAShared.__init__

    def slow_init(self, *args):
        init(self, *args)
        self._allocations = SlowMiss()

    kernelapi.FakeCUDAShared.__init__ = slow_init
    try:
        for _ in range(3):
            out = np.zeros(8)
            neighbour[1, 8](out)
            np.testing.assert_array_equal(out, np.roll(np.arange(8.0) + 1.0, -1))
    finally:
        kernelapi.FakeCUDAShared.__init__ = init


def main(group: str) -> None:
    sys.setswitchinterval(1e-4)
    from numba import config

    from xd_dask.kernels import _cuda

    assert config.ENABLE_CUDASIM, "run with NUMBA_ENABLE_CUDASIM=1"
    _atomic_shared_arrays()
    _check_shared_arrays()
    _cuda.POISON = True  # an output slot no thread wrote reads as NaN (status: an error)
    {"stats": _stats_cases, "projected": _projected_cases, "dispatch": _dispatch_cases,
     "nonpd": _nonpd_cases, "moves": _moves_cases}[group]()  # fmt: skip
    print(f"{group}: ok")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1])

"""Benchmark: compiled XD statistics kernel vs a NumPy batched-linalg XD step.

Prints, for D = 7 and K in {16, 64, 256}, float64 and float32, the time per (row x component)
pair of one statistics pass (DESIGN.md section 3):

- ``numba 1 thr``: ``pattern_stats_numba`` on one core (``numba.set_num_threads(1)``), compilation
  excluded (warm-up call first), best of several repeats;
- ``numba 2 thr``: the same with two threads, and the speed-up over one thread;
- ``numpy ref``: the reference kernel ``pattern_stats_ref`` (stacked ``numpy.linalg.cholesky`` /
  ``inv`` on (n, K, d, d) chunks, the way a direct NumPy XD E-step is written), best of two, on a
  subset of the rows; ``ratio`` = numpy ref / numba 1 thr;
- ``max rel err``: kernel vs reference on that subset (ll, n_j, a, C normwise), a sanity check.

and beside it, per pair, the posterior pass (DESIGN.md 4a) on the same rows:

- ``post kern``: the compiled posterior kernel of the pattern on one core
  (``pattern_posterior_numba``, outputs allocated once, as ``numba 1 thr`` accumulates into
  arrays of its own); ``/stats`` = post kern / numba 1 thr (target <= 2);
- ``post 1 thr``: ``xd_dask.kernels.posterior(..., backend="numba")``, the whole call as a user
  makes it (centring, the kernel, fresh float64 (n, D) means and (n, D, D) covariances);
- ``post ref``: the reference posterior (batched NumPy, float64) on a subset;
- ``post err``: compiled vs reference posterior on that subset, worst covariance entry in
  correlation units.

Then the projected statistics pass (rows seen through R_i, d = 2 observed of D = 3 true
features: tangential velocities), K = 16 and 64: ``numba R`` (one core) beside the reference with
R (``pattern_stats_ref``, batched NumPy), their ratio and the relative error, and the
no-projection d = 2 and d = 3 kernels on the same rows for scale.

Then the same figure for K = 64 with LLVM told to prefer 256-bit vectors (a subprocess with
``NUMBA_CPU_FEATURES=<host>,+prefer-256-bit``), to show what 512-bit vectors are worth. LLVM
prefers 256-bit vectors on Intel server CPUs (Skylake-X .. Sapphire Rapids); there,
``NUMBA_CPU_FEATURES="$(python -c 'import llvmlite.binding as l; print(l.get_host_cpu_features()
.flatten())'),-prefer-256-bit"`` gives the 512-bit code. The machine may be shared: figures are
best-of-N, and the spread (worst / best) of the single-thread repeats is printed.

Usage: python benchmarks/bench_kernel.py [--quick] [--no-vector-width] [--projected-only]
(Set XD_DASK_KERNEL_CACHE to keep compiled kernels between runs.)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import llvmlite.binding as llvm
import numba
import numpy as np

from xd_dask.kernels import posterior
from xd_dask.kernels._numba import pattern_stats_numba
from xd_dask.kernels.reference import pattern_stats_ref
from xd_dask.params import Params

D = 7
KS = (16, 64, 256)
PAIRS = 4_000_000  # rows x components per kernel run (~50-100 ms at ~15 ns per pair)
MAX_ROWS = 250_000
REF_PAIRS = 150_000  # the NumPy reference is ~100-300x slower
REPEATS_1, REPEATS_2, REPEATS_REF = 7, 5, 2


def make_data(n: int, d: int, K: int, seed: int = 0):
    """Realistic problem: distinct components, random SPD noise with per-row scale."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=2.0, size=(K, d))
    A = rng.normal(scale=0.6, size=(K, d, d))
    covs = A @ np.swapaxes(A, 1, 2) + rng.uniform(0.2, 1.0, size=(K, 1, 1)) * np.eye(d)
    log_weights = np.log(rng.dirichlet(np.full(K, 3.0)))
    comp = rng.integers(K, size=n)
    Bm = rng.normal(scale=0.3, size=(n, d, d))
    S = Bm @ np.swapaxes(Bm, 1, 2) + 0.05 * np.eye(d)
    S *= rng.uniform(0.2, 2.0, size=(n, 1, 1))  # heteroscedastic rows
    Lt = np.linalg.cholesky(covs[comp] + S)
    x = means[comp] + np.einsum("nij,nj->ni", Lt, rng.normal(size=(n, d)))
    rw = np.ones(n)
    return x, S, rw, log_weights, means, covs


def best_of(fn, repeats: int) -> tuple[float, float]:
    """(best, worst) wall time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), max(times)


def rel_err(got, want) -> float:
    err = 0.0
    for g, w in zip(got[:4], want[:4], strict=True):
        g, w = np.asarray(g), np.asarray(w)
        err = max(err, float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-300)))
    return err


def kernel_ns(x, S, rw, lw, m, V, threads: int, repeats: int) -> tuple[float, float]:
    numba.set_num_threads(threads)
    pattern_stats_numba(x, S, rw, lw, m, V)  # warm-up (compiles on first use)
    best, worst = best_of(lambda: pattern_stats_numba(x, S, rw, lw, m, V), repeats)
    pairs = x.shape[0] * m.shape[0]
    return best / pairs * 1e9, worst / best


def posterior_ns(x, S, lw, m, V, repeats: int, backend: str = "numba") -> float:
    """ns per pair of one posterior call on one thread (compilation excluded), best of N."""
    numba.set_num_threads(1)
    w = np.exp(lw)
    posterior(x[:64], S[:64], Params(w, m, V), backend=backend, check=False)  # compile / warm up
    best, _ = best_of(
        lambda: posterior(x, S, Params(w, m, V), backend=backend, check=False), repeats
    )
    return best / (x.shape[0] * m.shape[0]) * 1e9


def posterior_kernel_ns(x, S, lw, m, V, repeats: int) -> float:
    """ns per pair of the pattern-level compiled posterior kernel, outputs allocated once."""
    from xd_dask.kernels._numba_posterior import pattern_posterior_numba  # noqa: PLC0415
    from xd_dask.kernels._posterior import PosteriorJob, PosteriorSummary  # noqa: PLC0415

    numba.set_num_threads(1)
    n, d = x.shape
    out = PosteriorSummary.allocate(np, n, m.shape[0], d, 0, False)
    cols = np.arange(d)
    job = PosteriorJob(x, S, lw, m, V, None, np.arange(n), cols, x, np.zeros(d), None, 0, None, out)
    pattern_posterior_numba(job)
    best, _ = best_of(lambda: pattern_posterior_numba(job), repeats)
    return best / (n * m.shape[0]) * 1e9


def posterior_err(sub, m, V, lw) -> float:
    """Worst covariance difference, compiled vs reference posterior, in correlation units."""
    x, S = sub
    w = np.exp(lw)
    _, got = posterior(x, S, Params(w, m, V), backend="numba", check=False)
    _, want = posterior(x, S, Params(w, m, V), backend="reference", check=False)
    sd = np.sqrt(np.diagonal(want, axis1=1, axis2=2))
    return float((np.abs(got - want) / (sd[:, :, None] * sd[:, None, :])).max())


def make_projected(n: int, d: int, D: int, K: int, seed: int = 0):
    """Rows x = R v + noise with random orthonormal d x D rows R_i (a normal triad's shape),
    velocity-like components (tens of km/s) and heteroscedastic noise."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=30.0, size=(K, D))
    A = rng.normal(scale=15.0, size=(K, D, D))
    covs = A @ np.swapaxes(A, 1, 2) + 25.0 * np.eye(D)
    log_weights = np.log(rng.dirichlet(np.full(K, 3.0)))
    Q, _ = np.linalg.qr(rng.normal(size=(n, D, D)))
    R = np.ascontiguousarray(np.swapaxes(Q, 1, 2)[:, :d, :])  # (n, d, D), orthonormal rows
    comp = rng.integers(K, size=n)
    v = means[comp] + np.einsum(
        "nij,nj->ni", np.linalg.cholesky(covs[comp]), rng.normal(size=(n, D))
    )
    Bm = rng.normal(scale=2.0, size=(n, d, d))
    S = Bm @ np.swapaxes(Bm, 1, 2) + 0.5 * np.eye(d)
    x = np.einsum("nij,nj->ni", R, v) + np.einsum(
        "nij,nj->ni", np.linalg.cholesky(S), rng.normal(size=(n, d))
    )
    return x, S, R, np.ones(n), log_weights, means, covs


def projected_table() -> None:
    """ns per pair of the projected statistics pass (d = 2, D = 3) against the reference."""
    d, Dp = 2, 3
    print(
        f"\nprojected statistics pass, d = {d} observed, D = {Dp} true (R_i: {d} x {Dp}), 1 thread"
    )
    hdr = (
        f"{'K':>4} {'dtype':>7} {'rows':>7} | {'numba R':>8} | {'numpy ref R':>11} {'ratio':>6} | "
        f"{'max rel err':>11} | {'numba d=2':>9} {'numba d=3':>9}"
    )
    print(hdr)
    print("-" * len(hdr))
    numba.set_num_threads(1)
    for K in (16, 64):
        n = min(MAX_ROWS, PAIRS // K)
        x, S, R, rw, lw, m, V = make_projected(n, d, Dp, K, seed=K)
        for dt in (np.float64, np.float32):
            xs, Ss, Rs = x.astype(dt), S.astype(dt), R.astype(dt)
            run = functools.partial(pattern_stats_numba, xs, Ss, rw, lw, m, V, R=Rs)
            run()
            t, _ = best_of(run, REPEATS_1)
            nr = max(1, REF_PAIRS // K)
            sub = (xs[:nr], Ss[:nr], rw[:nr], lw, m, V, Rs[:nr])
            pattern_stats_ref(*sub)
            t_ref, _ = best_of(lambda sub=sub: pattern_stats_ref(*sub), REPEATS_REF)
            err = rel_err(
                pattern_stats_numba(*sub[:6], R=sub[6]),
                pattern_stats_ref(x[:nr], S[:nr], rw[:nr], lw, m, V, R[:nr]),
            )
            # the no-projection kernels on rows of the same sizes (d = 2 as observed, d = 3 as
            # if the full velocity were observed), for scale
            ns_plain = []
            for dd in (d, Dp):
                xp_, Sp_ = (np.ascontiguousarray(v, dtype=dt) for v in make_data(n, dd, K)[:2])
                mm, VV = m[:, :dd], V[:, :dd, :dd]
                plain = functools.partial(pattern_stats_numba, xp_, Sp_, rw, lw, mm, VV)
                plain()
                ns_plain.append(best_of(plain, REPEATS_1)[0] / (n * K) * 1e9)
            ns, ns_ref = t / (n * K) * 1e9, t_ref / (nr * K) * 1e9
            print(
                f"{K:>4} {np.dtype(dt).name:>7} {n:>7} | {ns:>8.1f} | {ns_ref:>11.0f} "
                f"{ns_ref / ns:>5.0f}x | {err:>11.1e} | {ns_plain[0]:>9.1f} {ns_plain[1]:>9.1f}"
            )
    print("(max rel err: float32 kernel against the float64 reference on the unrounded rows)")


def vector_width_child(K: int) -> None:
    """Subprocess entry: print JSON {dtype: ns per pair} for one K, one thread."""
    n = min(MAX_ROWS, PAIRS // K)
    x, S, rw, lw, m, V = make_data(n, D, K)
    out = {}
    for dt in (np.float64, np.float32):
        out[np.dtype(dt).name] = kernel_ns(x.astype(dt), S.astype(dt), rw, lw, m, V, 1, REPEATS_1)[
            0
        ]
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows and repeats")
    ap.add_argument("--no-vector-width", action="store_true", help="skip the 256-bit comparison")
    ap.add_argument("--projected-only", action="store_true", help="only the projected table")
    ap.add_argument("--child-k", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global PAIRS, REF_PAIRS, REPEATS_1, REPEATS_2
    if args.quick:
        PAIRS, REF_PAIRS, REPEATS_1, REPEATS_2 = 1_000_000, 50_000, 3, 3
    if args.child_k:
        vector_width_child(args.child_k)
        return
    if args.projected_only:
        projected_table()
        return

    t_start = time.perf_counter()
    host = llvm.get_host_cpu_name()
    print(
        f"XD statistics pass, D = {D}; numba {numba.__version__}, numpy {np.__version__}, "
        f"CPU {host} ({os.cpu_count()} logical), NUMBA_CPU_NAME={numba.config.CPU_NAME}, "
        f"NUMBA_CPU_FEATURES={'set' if numba.config.CPU_FEATURES else 'host default'}"
    )
    print("ns per (row x component) pair; best of N repeats (spread = worst/best, 1 thread)\n")
    hdr = (
        f"{'K':>4} {'dtype':>7} {'rows':>7} | {'numba 1 thr':>11} {'spread':>6} | "
        f"{'numba 2 thr':>11} {'speedup':>7} | {'numpy ref':>9} {'ratio':>6} | {'max rel err':>11}"
        f" || {'post kern':>9} {'/stats':>6} | {'post 1 thr':>10} | {'post ref':>8} | "
        f"{'post err':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for K in KS:
        n = min(MAX_ROWS, PAIRS // K)
        data64 = make_data(n, D, K, seed=K)
        for dt in (np.float64, np.float32):
            x, S, rw, lw, m, V = data64
            x, S = x.astype(dt), S.astype(dt)
            t_comp = time.perf_counter()
            numba.set_num_threads(1)
            pattern_stats_numba(x[:100], S[:100], rw[:100], lw, m, V)
            t_comp = time.perf_counter() - t_comp
            ns1, spread = kernel_ns(x, S, rw, lw, m, V, 1, REPEATS_1)
            ns2, _ = kernel_ns(x, S, rw, lw, m, V, 2, REPEATS_2)
            # NumPy batched-linalg reference on a subset of the rows.
            nr = max(1, REF_PAIRS // K)
            sub = (x[:nr], S[:nr], rw[:nr], lw, m, V)
            pattern_stats_ref(*sub)
            t_ref, _ = best_of(lambda sub=sub: pattern_stats_ref(*sub), REPEATS_REF)
            ns_ref = t_ref / (nr * K) * 1e9
            numba.set_num_threads(1)
            err = rel_err(pattern_stats_numba(*sub), pattern_stats_ref(*sub))
            # The posterior pass on the same rows, interleaved with the statistics pass.
            nsk = posterior_kernel_ns(x, S, lw, m, V, REPEATS_1)
            nsp = posterior_ns(x, S, lw, m, V, REPEATS_2)
            ns1b, _ = kernel_ns(x, S, rw, lw, m, V, 1, REPEATS_1)
            ns1 = min(ns1, ns1b)
            nsk = min(nsk, posterior_kernel_ns(x, S, lw, m, V, REPEATS_1))
            nsp_ref = posterior_ns(x[:nr], S[:nr], lw, m, V, REPEATS_REF, "reference")
            perr = posterior_err((x[:nr], S[:nr]), m, V, lw)
            print(
                f"{K:>4} {np.dtype(dt).name:>7} {n:>7} | {ns1:>11.1f} {spread:>6.2f} | "
                f"{ns2:>11.1f} {ns1 / ns2:>6.2f}x | {ns_ref:>9.0f} {ns_ref / ns1:>5.0f}x | "
                f"{err:>11.1e} || {nsk:>9.1f} {nsk / ns1:>5.2f}x | {nsp:>10.1f} | "
                f"{nsp_ref:>8.0f} | {perr:>8.1e}"
                + (f"   (first call incl. compile {t_comp:.1f} s)" if t_comp > 0.5 else "")
            )
    print(
        "\ntargets (issue 2): <= 60 ns float64, <= 25 ns float32 at K = 64, one core; "
        "float32 statistics are accumulated in float64 (per-thread float32 partial sums "
        "over <= 2048 rows); (issue 8) posterior <= 2x the statistics pass per pair"
    )
    projected_table()

    if not args.no_vector_width:
        K = 64
        feats = llvm.get_host_cpu_features().flatten()
        env = dict(os.environ, NUMBA_CPU_NAME=host, NUMBA_CPU_FEATURES=feats + ",+prefer-256-bit")
        cmd = [sys.executable, __file__, "--child-k", str(K)] + (["--quick"] if args.quick else [])
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        narrow = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"\nK = {K}, 1 thread, LLVM forced to prefer 256-bit vectors (+prefer-256-bit):")
        for name, ns in narrow.items():
            print(f"  {name:>7}: {ns:6.1f} ns per pair")
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

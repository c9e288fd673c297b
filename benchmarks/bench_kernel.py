"""Benchmark of the CPU kernels, every figure side by side in one run (README's performance
table is regenerated from this output).

The machine may be shared (here: 2 vCPUs, load 8-14 from other users): single-thread figures are
THREAD CPU time (``time.thread_time``: the kernel runs in the calling thread with
``numba.set_num_threads(1)``, so other processes' load inflates them far less than wall time;
co-scheduled hyperthreads and caches still do), best of N; two-thread figures are wall time.
Ratios are taken between figures measured in the same run, interleaved.

1. Statistics pass (DESIGN.md 3), D = 7, K in {16, 64, 256}, float64 and float32: ns per
   (row x component) pair of ``pattern_stats_numba`` on one and two threads, the NumPy
   batched-linalg reference on a subset and their ratio, and the kernel's error against it.
2. Posteriors (DESIGN.md 4a) against the statistics pass, 20,000 rows, one thread, per pair:
   the whole calls as a user makes them - ``compute_stats`` and ``XDModel.posterior`` (outputs
   allocated, centring, validation of S and R, the moments, escalated rows; ``check=True``, the
   default) and both with ``check=False`` (rows a reader validated) - the posterior kernel alone
   on preallocated outputs, and the ratios. The target (issue 20): whole posterior <= 1.3x the
   statistics pass.
3. The log densities and the split-and-merge sums (the densities pass's two modes) per pair,
   beside the statistics pass.
4. Projected statistics (rows through R_i, d = 2 of D = 3: tangential velocities), K = 16 and
   64, against the reference with R.
5. Compilation, cold and warm, in fresh processes: the variants a D = 7 fit of Gaia-like rows
   compiles (statistics and densities passes for d = 7, 6, 4, 3 observed fields, float64),
   seconds each
   with an empty kernel cache, the same from the cache, and two processes sharing one empty
   cache (two workers) side by side with one.
6. K = 64 with LLVM told to prefer 256-bit vectors (a subprocess), to show what 512-bit vectors
   are worth on this CPU.

Usage: python benchmarks/bench_kernel.py [--quick] [--sections 1,2,3,4,5,6]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import llvmlite.binding as llvm
import numba
import numpy as np

from xd_dask.kernels import compute_stats, log_component_densities, move_sums, posterior
from xd_dask.kernels._numba import pattern_stats_numba
from xd_dask.kernels._numba_posterior import pattern_posterior_numba
from xd_dask.kernels._posterior import POSTERIOR
from xd_dask.kernels.driver import Block, Call
from xd_dask.kernels.reference import pattern_stats_ref
from xd_dask.model import XDModel
from xd_dask.params import Params

D = 7
KS = (16, 64, 256)
PAIRS = 4_000_000  # rows x components per kernel run (~100 ms at ~25 ns per pair)
MAX_ROWS = 250_000
REF_PAIRS = 150_000  # the NumPy reference is ~100-300x slower
POST_ROWS = 20_000  # the posterior comparison's block (issue 20)
REPEATS_1, REPEATS_2, REPEATS_REF = 7, 5, 2
CLOCK = time.thread_time  # one-thread figures: CPU time of the calling thread


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


def best_of(fn, repeats: int, clock=CLOCK) -> tuple[float, float]:
    """(best, worst) time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times), max(times)


def rel_err(got, want) -> float:
    err = 0.0
    for g, w in zip(got[:4], want[:4], strict=True):
        g, w = np.asarray(g), np.asarray(w)
        err = max(err, float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-300)))
    return err


def stats_ns(x, S, rw, lw, m, V, threads: int, repeats: int) -> tuple[float, float]:
    """ns per pair of ``pattern_stats_numba`` (CPU time on one thread, wall time on more)."""
    numba.set_num_threads(threads)
    pattern_stats_numba(x, S, rw, lw, m, V)  # warm-up (compiles on first use)
    clock = CLOCK if threads == 1 else time.perf_counter
    best, worst = best_of(lambda: pattern_stats_numba(x, S, rw, lw, m, V), repeats, clock)
    return best / (x.shape[0] * m.shape[0]) * 1e9, worst / best


def stats_table() -> None:
    print("1. statistics pass, D = 7: ns per (row x component) pair, best of N")
    hdr = (
        f"{'K':>4} {'dtype':>7} {'rows':>7} | {'1 thread':>8} {'spread':>6} | {'2 threads':>9} "
        f"{'speedup':>7} | {'numpy ref':>9} {'ratio':>6} | {'max rel err':>11}"
    )
    print(hdr + "\n" + "-" * len(hdr))
    for K in KS:
        n = min(MAX_ROWS, PAIRS // K)
        x64, S64, rw, lw, m, V = make_data(n, D, K, seed=K)
        for dt in (np.float64, np.float32):
            x, S = x64.astype(dt), S64.astype(dt)
            t0 = time.perf_counter()
            numba.set_num_threads(1)
            pattern_stats_numba(x[:100], S[:100], rw[:100], lw, m, V)
            t_comp = time.perf_counter() - t0
            ns1, spread = stats_ns(x, S, rw, lw, m, V, 1, REPEATS_1)
            ns2, _ = stats_ns(x, S, rw, lw, m, V, 2, REPEATS_2)
            nr = max(1, REF_PAIRS // K)
            sub = (x[:nr], S[:nr], rw[:nr], lw, m, V)
            pattern_stats_ref(*sub)
            t_ref, _ = best_of(lambda sub=sub: pattern_stats_ref(*sub), REPEATS_REF)
            ns_ref = t_ref / (nr * K) * 1e9
            numba.set_num_threads(1)
            err = rel_err(pattern_stats_numba(*sub), pattern_stats_ref(*sub))
            print(
                f"{K:>4} {np.dtype(dt).name:>7} {n:>7} | {ns1:>8.1f} {spread:>6.2f} | "
                f"{ns2:>9.1f} {ns1 / ns2:>6.2f}x | {ns_ref:>9.0f} {ns_ref / ns1:>5.0f}x | "
                f"{err:>11.1e}"
                + (f"   (first call incl. compile {t_comp:.1f} s)" if t_comp > 0.5 else "")
            )


def posterior_kernel_call(x, S, lw, m, V):
    """The compiled posterior kernel on one pattern with outputs allocated once (a closure)."""
    n, d = x.shape
    K = m.shape[0]
    call = Call(np, n, K, d, x, Params(np.exp(lw), m, V), False, {"top_k": 0})
    out = POSTERIOR.begin(call)
    cols = np.arange(d)
    block = Block(x, S, None, None, lw, m, V, None, np.arange(n), cols, np.zeros(d), x, None, out,
                  call.options)  # fmt: skip
    return lambda: pattern_posterior_numba(block)


def posterior_table() -> None:
    """Whole calls per pair: the posterior against the statistics pass (issue 20)."""
    n = POST_ROWS
    print(f"\n2. posteriors against the statistics pass, {n} rows, D = 7, one thread, "
          "CPU ns per pair, best of N")  # fmt: skip
    hdr = (
        f"{'K':>4} {'dtype':>7} | {'stats':>6} {'post':>6} {'ratio':>5} | {'stats':>6} "
        f"{'XDModel':>7} {'ratio':>5} | {'kernels':>7} {'ratio':>5} | {'reference post':>14}"
    )
    print(f"{'':>12} | {'check=False':^20} | {'check=True (default)':^22} | "
          f"{'kernels alone':^13} |")  # fmt: skip
    print(hdr + "\n" + "-" * len(hdr))
    numba.set_num_threads(1)
    for K in KS:
        x64, S64, rw, lw, m, V = make_data(n, D, K, seed=K)
        p = Params(np.exp(lw), m, V)
        model = XDModel(p)
        for dt in (np.float64, np.float32):
            x, S = x64.astype(dt), S64.astype(dt)
            kern = posterior_kernel_call(x, S, lw, m, V)
            calls = {
                "stats0": functools.partial(compute_stats, x, S, p, check=False),
                "post0": functools.partial(posterior, x, S, p, check=False),
                "stats1": functools.partial(compute_stats, x, S, p),
                "model": functools.partial(model.posterior, x, S),
                "skern": functools.partial(pattern_stats_numba, x, S, rw, lw, m, V),
                "pkern": kern,
            }
            posterior(x, S, p, backend="numba")  # compile (or load) the kernels first
            for fn in calls.values():
                fn()
            best = {k: np.inf for k in calls}
            for _ in range(REPEATS_1):  # interleaved: the machine's load hits all alike
                for k, fn in calls.items():
                    best[k] = min(best[k], best_of(fn, 1)[0])
            ns = {k: v / (n * K) * 1e9 for k, v in best.items()}
            nr = max(1, REF_PAIRS // K)
            sub = functools.partial(posterior, x[:nr], S[:nr], p, backend="reference")
            ref, _ = best_of(sub, 1)
            print(
                f"{K:>4} {np.dtype(dt).name:>7} | {ns['stats0']:>6.1f} {ns['post0']:>6.1f} "
                f"{ns['post0'] / ns['stats0']:>5.2f} | {ns['stats1']:>6.1f} {ns['model']:>7.1f} "
                f"{ns['model'] / ns['stats1']:>5.2f} | {ns['pkern'] / ns['skern']:>7.2f} "
                f"{'':>5} | {ref / (nr * K) * 1e9:>14.0f}"
            )
    print("(kernels alone: posterior kernel / statistics kernel on the same rows, outputs "
          "preallocated)")  # fmt: skip


def modes_table() -> None:
    """The densities pass's modes (log densities, split-and-merge sums) beside the statistics."""
    print("\n3. statistics, log densities, split-and-merge sums: CPU ns per pair, D = 7, 1 thread")
    hdr = f"{'K':>4} {'dtype':>7} | {'statistics':>10} {'log densities':>13} {'moves':>6}"
    print(hdr + "\n" + "-" * len(hdr))
    numba.set_num_threads(1)
    for K in (16, 64):
        n = min(MAX_ROWS, PAIRS // K // 4)
        x64, S64, rw, lw, m, V = make_data(n, D, K, seed=K)
        p = Params(np.exp(lw), m, V)
        for dt in (np.float64, np.float32):
            x, S = x64.astype(dt), S64.astype(dt)
            fns = {
                "stats": functools.partial(compute_stats, x, S, p, check=False),
                "logdens": functools.partial(log_component_densities, x, S, p, check=False),
                "moves": functools.partial(move_sums, x, S, p, check=False),
            }
            ns = {}
            for k, fn in fns.items():
                fn()
                ns[k] = best_of(fn, REPEATS_2)[0] / (n * K) * 1e9
            print(f"{K:>4} {np.dtype(dt).name:>7} | {ns['stats']:>10.1f} "
                  f"{ns['logdens']:>13.1f} {ns['moves']:>6.1f}")  # fmt: skip


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
        f"\n4. projected statistics pass, d = {d} observed, D = {Dp} true (R_i: {d} x {Dp}), "
        "1 thread"
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


_COMPILE_CHILD = """
import json, sys, time
from xd_dask.kernels import _numba
keys = [tuple(k) for k in json.loads(sys.argv[1])]
out = {}
t_all = time.perf_counter()
if sys.argv[2] == "warm":
    _numba.warm(keys)
    out["total"] = time.perf_counter() - t_all
else:
    for k in keys:
        t0 = time.perf_counter()
        fn = _numba._kernel(*k)
        out["_".join(map(str, k))] = [time.perf_counter() - t0, bool(fn.stats.cache_hits)]
    out["total"] = time.perf_counter() - t_all
print(json.dumps(out))
"""


def _children(keys, mode: str, cache: str, n: int) -> list[dict]:
    env = dict(os.environ, XD_DASK_KERNEL_CACHE=cache)
    cmd = [sys.executable, "-c", _COMPILE_CHILD, json.dumps(keys), mode]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def compile_table() -> None:
    """Cold and warm compilation of what a D = 7 fit of Gaia-like rows needs (issue 20)."""
    keys = [[kind, d, False, 0, 0] for d in (7, 6, 4, 3) for kind in ("stats", "dens")]
    print(
        "\n5. compilation of a D = 7 fit's CPU kernels (statistics and densities passes for "
        "d = 7, 6, 4, 3 observed fields, float64; the densities pass gives the log densities "
        "and the split-and-merge sums), wall seconds"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cold = _children(keys, "each", os.path.join(tmp, "a"), 1)[0]
        warm = _children(keys, "each", os.path.join(tmp, "a"), 1)[0]
        for k in keys:
            name = "_".join(map(str, k))
            print(f"  {k[0]:>5} d={k[1]}: cold {cold[name][0]:5.1f} s, warm {warm[name][0]:4.2f} s"
                  f" ({'from disk' if warm[name][1] else 'compiled again?'})")  # fmt: skip
        print(f"  one process : cold {cold['total']:5.1f} s, warm {warm['total']:4.2f} s "
              f"({len(keys)} variants)")  # fmt: skip
        t0 = time.perf_counter()
        two = _children(keys, "warm", os.path.join(tmp, "b"), 2)
        wall = time.perf_counter() - t0
        print(f"  two processes sharing an empty cache (a cluster's workers): {wall:5.1f} s wall "
              f"(each {two[0]['total']:.1f} / {two[1]['total']:.1f} s)")  # fmt: skip


def vector_width_child(K: int) -> None:
    """Subprocess entry: print JSON {dtype: ns per pair} for one K, one thread."""
    n = min(MAX_ROWS, PAIRS // K)
    x, S, rw, lw, m, V = make_data(n, D, K)
    out = {}
    for dt in (np.float64, np.float32):
        out[np.dtype(dt).name] = stats_ns(x.astype(dt), S.astype(dt), rw, lw, m, V, 1, REPEATS_1)[0]
    print(json.dumps(out))


def vector_width() -> None:
    K = 64
    host = llvm.get_host_cpu_name()
    feats = llvm.get_host_cpu_features().flatten()
    env = dict(os.environ, NUMBA_CPU_NAME=host, NUMBA_CPU_FEATURES=feats + ",+prefer-256-bit")
    cmd = [sys.executable, __file__, "--child-k", str(K)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    narrow = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\n6. K = {K}, 1 thread, LLVM forced to prefer 256-bit vectors (+prefer-256-bit):")
    for name, ns in narrow.items():
        print(f"  {name:>7}: {ns:6.1f} ns per pair")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows and repeats")
    ap.add_argument("--sections", default="1,2,3,4,5,6", help="which sections (comma-separated)")
    ap.add_argument("--child-k", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global PAIRS, REF_PAIRS, REPEATS_1, REPEATS_2
    if args.quick:
        PAIRS, REF_PAIRS, REPEATS_1, REPEATS_2 = 1_000_000, 50_000, 3, 3
    if args.child_k:
        vector_width_child(args.child_k)
        return
    t_start = time.perf_counter()
    print(
        f"XD kernels; numba {numba.__version__}, numpy {np.__version__}, CPU "
        f"{llvm.get_host_cpu_name()} ({os.cpu_count()} logical), load average "
        f"{os.getloadavg()[0]:.1f}; one-thread figures are thread CPU time\n"
    )
    sections = {"1": stats_table, "2": posterior_table, "3": modes_table,
                "4": projected_table, "5": compile_table, "6": vector_width}  # fmt: skip
    for key in args.sections.split(","):
        sections[key.strip()]()
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

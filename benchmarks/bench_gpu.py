"""Device check and benchmark of the GPU kernels, for a machine with one NVIDIA GPU.

Needs nothing but the repository and ``pip install -e ".[gpu]"`` (plus pytest for step 1).
Without a usable device it says why and exits 0, measuring nothing (no GPU figure is ever
estimated here). On a device, in under ~5 minutes:

1. the GPU tests (``pytest -m gpu``: the numba.cuda kernels against the reference on device
   arrays, a non-default stream, the dask-cuda batch EM against the CPU fit);
2. ns per (row x component) pair of one statistics pass (D = 7, K = 64 and 256, float32 and
   float64) of the generated CUDA kernel (fused for K <= 256) on device-resident rows, timed with
   CUDA events (best of 5, compilation excluded), beside one CPU core of the same host running
   the compiled CPU kernel on the same rows (``numba.set_num_threads(1)``), and the
   split-and-merge sums (the ``moves`` kernel, which GPU workers now run) on the same device
   rows;
3. one batch-EM iteration on a ``LocalCUDACluster`` over a generated 10 M-row catalogue
   (D = 3, K = 16, float32 rows, persisted on the device): wall time of the iteration.

Compare the figures with the README's performance table (estimates until this has run).
Usage: python benchmarks/bench_gpu.py [--skip-tests] [--rows 10000000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def device_or_exit():
    from xd_dask.distributed.gpu import device_info

    info = device_info()
    if not info["ok"]:
        print(f"bench_gpu: no usable GPU here ({info['reason']}); nothing measured.")
        sys.exit(0)
    print(f"device: {info['name']} (compute capability {info['compute_capability']})")
    return info


def run_tests() -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-n", "0", "-p", "no:cacheprovider",
           "tests/test_gpu.py", "tests/test_distributed_gpu.py"]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-2000:])
    print(f"GPU tests: exit {res.returncode} in {time.perf_counter() - t0:.0f} s")
    if res.returncode != 0:
        print(res.stdout[-4000:])


def kernel_table() -> None:
    import cupy
    import numba

    from benchmarks.bench_kernel import make_data
    from xd_dask.kernels._cuda import pack_lower, pattern_moves_cuda, pattern_stats_cuda
    from xd_dask.kernels._numba import pattern_stats_numba

    D = 7
    print(f"\nstatistics pass, D = {D}: ns per pair (best of 5; CPU: 1 core, same rows)")
    print(f"{'K':>4} {'dtype':>7} {'rows':>9} | {'GPU':>8} | {'CPU 1 core':>10} {'ratio':>7} | "
          f"{'moves GPU':>9}")  # fmt: skip
    numba.set_num_threads(1)
    for K in (64, 256):
        n = 400_000_000 // K // 8  # ~5e7 pairs on the device
        x, S, rw, lw, m, V = make_data(n, D, K, seed=K)
        for dt in (np.float32, np.float64):
            xd = cupy.asarray(x.astype(dt))
            Sd = pack_lower(cupy.asarray(S.astype(dt)))
            rwd = cupy.asarray(rw)
            ns_gpu = _device_ns(pattern_stats_cuda, (xd, Sd, rwd, lw, m, V), n * K, 5)
            ns_moves = _device_ns(pattern_moves_cuda, (xd, Sd, rwd, lw, m, V), n * K, 3)
            nc = min(n, 2_000_000 // K)
            xc, Sc = x[:nc].astype(dt), S[:nc].astype(dt)
            pattern_stats_numba(xc[:100], Sc[:100], rw[:100], lw, m, V)
            t_cpu = np.inf
            for _ in range(3):
                t0 = time.perf_counter()
                pattern_stats_numba(xc, Sc, rw[:nc], lw, m, V)
                t_cpu = min(t_cpu, time.perf_counter() - t0)
            ns_cpu = t_cpu / (nc * K) * 1e9
            print(f"{K:>4} {np.dtype(dt).name:>7} {n:>9} | {ns_gpu:>8.3f} | {ns_cpu:>10.2f} "
                  f"{ns_cpu / ns_gpu:>6.0f}x | {ns_moves:>9.3f}")  # fmt: skip
            del xd, Sd
            cupy.get_default_memory_pool().free_all_blocks()


def _device_ns(fn, args, pairs: int, repeats: int) -> float:
    """ns per pair of ``fn(*args)`` on the device, CUDA events, best of ``repeats`` (the first
    call, on 1000 rows, compiles)."""
    import cupy

    fn(*(a[:1000] if hasattr(a, "shape") and a.shape[0] == args[0].shape[0] else a
         for a in args))  # fmt: skip
    best = np.inf
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn(*args)
        stop.record()
        stop.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, stop) * 1e-3)
    return best / pairs * 1e9


def cluster_iteration(n_rows: int) -> None:
    from tests.distributed_data import make_rows, schema, write_catalog
    from xd_dask.distributed import FitConfig, connect, fit_catalog

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        parts = []
        step = 1_000_000
        for s in range(0, n_rows, step):
            parts.append(make_rows(seed=s, n=min(step, n_rows - s)))
        X = np.concatenate([p[0] for p in parts])
        S = np.concatenate([p[1] for p in parts])
        del parts
        write_catalog(Path(tmp) / "cat", X, S, max(1, n_rows // 500_000))
        del X, S
        print(f"\ncatalogue: {n_rows:,} rows written in {time.perf_counter() - t0:.0f} s")
        client, cluster = connect(gpu=True, n_workers=1, dashboard_address="")
        try:
            base = dict(catalog=str(Path(tmp) / "cat"), n_components=16, schema=schema(),
                        tol=0.0, seed=1, gpu=True, persist=True, dtype="float32")  # fmt: skip
            t0 = time.perf_counter()
            fit_catalog(FitConfig(**base, max_iter=1), client)
            t1 = time.perf_counter() - t0
            t0 = time.perf_counter()
            fit_catalog(FitConfig(**base, max_iter=3), client)
            t3 = time.perf_counter() - t0
        finally:
            client.close()
            cluster.close()
        print(f"LocalCUDACluster fit, {n_rows:,} rows, K = 16: 1 iteration {t1:.1f} s, "
              f"3 iterations {t3:.1f} s (each includes read, persist and initialisation); "
              f"one EM iteration ~{(t3 - t1) / 2:.2f} s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--rows", type=int, default=10_000_000)
    args = ap.parse_args()
    os.chdir(REPO)
    t0 = time.perf_counter()
    device_or_exit()
    if not args.skip_tests:
        run_tests()
    kernel_table()
    cluster_iteration(args.rows)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

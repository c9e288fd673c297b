"""Benchmark: the cost of a distributed fit, and batch EM vs online EM vs Adam on a sky-ordered
catalogue (Ritchie & Murray 2019's comparison: held-out log-likelihood against wall time).

On a synthetic Gaia-like catalogue (``xd_dask.io.synthetic.make_catalog``: HEALPix-range files
like Gaia's bulk files; default 10 million rows in 40 files, D = 7, K = 16), prints:

1. single-process baselines on the first files (up to ``--baseline-rows``, scaled per row to the
   whole catalogue): read + validate + statistics one file at a time with one thread, the read
   alone, one in-memory statistics pass with 1 and with W kernel threads (the machine's own
   W-thread speed-up; on a VM whose vCPUs share a core it is well below W);
2. ``cluster iteration``: seconds per batch-EM iteration (best of ``--iterations``, like the
   best-of baselines; the median too; warm-started from a fixed model) on a LocalCluster of W
   single-threaded workers, reading Parquet in every iteration, and, unless ``--skip-persist``,
   with the partitions held in worker memory;
   ``efficiency vs ceiling`` = (single-thread streaming time / W-thread speed-up) / iteration,
   the in-process ceiling of read + kernel work at this machine's W-thread speed (target >= 0.85);
3. k-means initialisation cost in batch-iteration equivalents (against the streamed iterations of
   the same fit): the default (k-means on a bounded sample + one pass) and the former default
   (10 Lloyd passes seeded from 2000 rows), with the mean log-likelihood of the start each gives;
4. unless ``--skip-comparison``: the table of ``benchmarks/gaps.py`` on this catalogue: held-out
   (15 % by source-id hash) mean log-likelihood per row of converged batch EM (tol 1e-6), online
   EM and Adam at their defaults, in cluster memory and (``--out-of-memory``, per worker) out of
   it on the sky-ordered files (refused) and on a shuffled copy; differences in nats/row with
   paired standard errors against batch EM and the generating model; Adam against online EM at
   equal passes;
5. a projection of one pass over 1.8 billion rows at K = 256 from the measured cost per pair.

Usage: python benchmarks/bench_fit.py [--rows N] [--partitions P] [--components K]
       [--iterations I] [--workers W] [--memory-limit 5GiB] [--data-dir DIR] [--json OUT]
Small check: python benchmarks/bench_fit.py --rows 300000 --partitions 12 --out-of-memory ''
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from xd_dask.params import Params

D = 7


def warm_start(X: np.ndarray, K: int, features, seed: int = 1):
    """A fixed, reasonable starting model: random complete rows as means, a shrunk global
    covariance of the complete rows."""
    from xd_dask.model import XDModel

    rng = np.random.default_rng(seed)
    X = X[~np.isnan(X).any(axis=1)]
    means = X[rng.choice(X.shape[0], size=K, replace=False)]
    cov = np.cov(X, rowvar=False) / K ** (2.0 / D)
    return XDModel(Params(np.full(K, 1.0 / K), means, np.repeat(cov[None], K, axis=0)), features)


def single_process(files, schema, model, threads: int, repeats: int = 2) -> dict:
    """Single-process baselines on ``files`` (best of ``repeats``): stream (read + statistics
    per file, one thread), read alone, in-memory pass with 1 and with ``threads`` threads."""
    import numba

    from xd_dask.io import read_partition
    from xd_dask.kernels import compute_stats

    numba.set_num_threads(1)
    p = Params(model.weights, model.means, model.covariances)
    warm = read_partition(str(files[0]), schema)
    compute_stats(warm.X[:2000], warm.X_cov[:2000], p, check=False)  # compile
    t_stream, t_read = [], []
    for _ in range(repeats):
        t0, tr = time.perf_counter(), 0.0
        for f in files:
            t1 = time.perf_counter()
            blk = read_partition(str(f), schema)
            tr += time.perf_counter() - t1
            compute_stats(blk.X, blk.X_cov, p, check=False)
            del blk
        t_stream.append(time.perf_counter() - t0)
        t_read.append(tr)
    blocks = [read_partition(str(f), schema) for f in files]

    def memory_pass() -> float:
        t0 = time.perf_counter()
        for b in blocks:
            compute_stats(b.X, b.X_cov, p, check=False)
        return time.perf_counter() - t0

    t_mem = min(memory_pass() for _ in range(repeats))
    numba.set_num_threads(threads)
    t_par = min(memory_pass() for _ in range(repeats))
    numba.set_num_threads(1)
    rows = sum(b.X.shape[0] for b in blocks)
    return {
        "rows": rows,
        "stream_s": min(t_stream),
        "read_s": min(t_read),
        "memory_s": t_mem,
        "memory_threads_s": t_par,
    }


def _median_iteration(model, skip_first: bool) -> tuple[float, float]:
    hist = model.metadata["history"][1 if skip_first else 0 :]
    return (
        statistics.median(h["seconds"] for h in hist),
        statistics.median(h["task_seconds"] for h in hist),
    )


def _best_iteration(model, skip_first: bool) -> tuple[float, float]:
    """(seconds, task seconds) of the fastest iteration: on a shared machine the best of N is
    the figure least disturbed by other processes (as for the single-process baselines)."""
    hist = model.metadata["history"][1 if skip_first else 0 :]
    best = min(hist, key=lambda h: h["seconds"])
    return best["seconds"], best["task_seconds"]


def compare_methods(client, cat: Path, K: int, args, root: Path, cluster_kw: dict) -> dict:
    """Section 4: :func:`gaps.run` on this catalogue (held-out nats/row with paired standard
    errors against converged batch EM and the generating model; out of memory too unless
    ``--out-of-memory ''``)."""
    from distributed import Client, LocalCluster
    from gaps import equal_passes, print_header, run

    from xd_dask.distributed.shuffle import shuffle_catalog

    work = root / "gaps-work"
    work.mkdir(exist_ok=True)
    print_header(f"K = {K}, {args.rows:,} rows in {args.partitions} sky-ordered files, 15 % held "
                 "out by id")  # fmt: skip
    if not args.out_of_memory:
        rows = run(client, str(cat), K, work)
    else:
        shuffled = root / f"{cat.name}-shuffled"
        if not shuffled.exists():
            shuffle_catalog(cat, shuffled, args.partitions, client, seed=3)
        kw = dict(cluster_kw, memory_limit=args.out_of_memory)
        with LocalCluster(**kw) as small_cl, Client(small_cl) as small:
            rows = run(client, str(cat), K, work, small, str(shuffled))
    equal_passes(rows, rows["batch EM (tol 1e-6)"]["heldout"])
    return {k: {a: b for a, b in v.items() if a != "ll"} for k, v in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--partitions", type=int, default=40)
    ap.add_argument("--components", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="5GiB", help="per worker")
    ap.add_argument("--baseline-rows", type=int, default=2_500_000)
    ap.add_argument("--out-of-memory", default="1GiB", help="section 4: memory per worker of "
                    "the out-of-memory runs ('' to skip them)")  # fmt: skip
    ap.add_argument("--skip-persist", action="store_true")
    ap.add_argument("--skip-comparison", action="store_true")
    ap.add_argument("--data-dir", default=None, help="catalogue cache (default: a temp dir)")
    ap.add_argument("--gpu-ns-per-pair", type=float, default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)

    from distributed import Client, LocalCluster

    from xd_dask.distributed import FitConfig, fit_catalog
    from xd_dask.io import load_schema, read_partition
    from xd_dask.io.synthetic import make_catalog

    N, P, K, W = args.rows, args.partitions, args.components, args.workers
    tmp = tempfile.TemporaryDirectory(prefix="xd-bench-")
    root = Path(args.data_dir or tmp.name)
    cat = root / f"gaia-{N}-{P}"
    if not cat.exists():
        t0 = time.perf_counter()
        make_catalog(cat, N, P, seed=0)
        print(
            f"wrote {N:,} rows in {P} HEALPix-range files to {cat} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    files = sorted(cat.glob("*.parquet"))
    schema = load_schema("gaia_dr3")
    features = list(schema.features)
    model0 = warm_start(read_partition(str(files[0]), schema).X, K, features)
    model_path = root / f"init-K{K}.npz"
    model0.save(model_path)
    res: dict = {"rows": N, "partitions": P, "K": K, "D": D, "workers": W}
    res["load_average_start"] = os.getloadavg()[0]

    sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
    n_base = int(np.searchsorted(np.cumsum(sizes), args.baseline_rows)) + 1
    base = single_process(files[: min(n_base, len(files))], schema, model0, threads=W, repeats=3)
    scale = sum(sizes) / base["rows"]
    speedup = base["memory_s"] / base["memory_threads_s"]
    ceiling = base["stream_s"] * scale / speedup
    res["baseline"] = base | {"scale_to_catalogue": scale, "threads_speedup": speedup}
    res["ceiling_s"] = ceiling

    warm = dict(catalog=str(cat), n_components=K, schema=schema, tol=0.0, init=str(model_path))
    cluster_kw = dict(n_workers=W, threads_per_worker=1, processes=True, dashboard_address=":0")
    with (
        LocalCluster(**cluster_kw, memory_limit=args.memory_limit) as cluster,
        Client(cluster) as client,
    ):
        fit_catalog(FitConfig(**warm, max_iter=2), client)  # compile in every worker
        stream = fit_catalog(FitConfig(**warm, max_iter=args.iterations), client)
        t_stream, busy_stream = _best_iteration(stream, skip_first=False)
        res |= {"cluster_stream_iter_s": t_stream, "cluster_stream_task_s": busy_stream}
        res["cluster_stream_iter_median_s"] = _median_iteration(stream, skip_first=False)[0]
        res["efficiency_vs_ceiling"] = ceiling / t_stream
        if not args.skip_persist:
            persist = fit_catalog(
                FitConfig(**warm, max_iter=args.iterations + 1, persist=True), client
            )
            t_persist, busy_persist = _best_iteration(persist, skip_first=True)
            res |= {"cluster_persist_iter_s": t_persist, "cluster_persist_task_s": busy_persist}
            res["efficiency_persisted"] = base["memory_s"] * scale / speedup / t_persist
        # k-means: the default against the former default (10 passes, 2000-row seeding)
        # (each against the iterations of its own fit, run right after it: the same load)
        kmeans = {}
        cold = dict(catalog=str(cat), n_components=K, schema=schema, max_iter=3, tol=0.0)
        for name, kw in {
            "sample + 1 pass (default)": {},
            "10 Lloyd passes (before)": dict(kmeans_iter=10, kmeans_sample=2000),
        }.items():
            m = fit_catalog(FitConfig(**cold, **kw), client)
            init = m.metadata["init"]
            t_iter = _median_iteration(m, skip_first=False)[0]
            kmeans[name] = {
                "seconds": init["seconds"],
                "iteration_s": t_iter,
                "iterations_worth": init["seconds"] / t_iter,
                "start_mean_loglike": m.metadata["history"][0]["mean_loglike"],
                "by_step": init.get("seconds_by_step"),
            }
        res["kmeans"] = kmeans
        if not args.skip_comparison:
            res["comparison"] = compare_methods(client, cat, K, args, root, cluster_kw)
    res["load_average_end"] = os.getloadavg()[0]
    _report(res, args, sizes)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    tmp.cleanup()


def _report(res: dict, args, sizes: list[int]) -> None:
    W, K, N = res["workers"], res["K"], sum(sizes)
    b = res["baseline"]
    pairs = N * K
    print(
        f"\ncatalogue: {N:,} rows in {len(sizes)} HEALPix-range files "
        f"({min(sizes):,}..{max(sizes):,} rows)  D {D}  K {K}  workers {W} x 1 thread"
    )
    print(f"single process on {b['rows']:,} rows, scaled x{b['scale_to_catalogue']:.2f}:")
    print(
        f"  1 thread: read + stats per file {b['stream_s'] * b['scale_to_catalogue']:.3f} s "
        f"(read {b['read_s'] * b['scale_to_catalogue']:.3f} s); in-memory pass "
        f"{b['memory_s'] * b['scale_to_catalogue']:.3f} s"
    )
    print(
        f"  {W} kernel threads in one process: {b['threads_speedup']:.2f}x one thread -> "
        f"in-process ceiling of a streamed iteration {res['ceiling_s']:.3f} s"
    )
    t = res["cluster_stream_iter_s"]
    print(
        f"cluster iteration, Parquet read: best {t:.3f} s, median "
        f"{res['cluster_stream_iter_median_s']:.3f} s ({1e9 * W * t / pairs:.1f} ns/pair/worker, "
        f"busy {res['cluster_stream_task_s'] / (W * t):.0%})"
    )
    print(
        f"  efficiency vs in-process ceiling = {res['ceiling_s']:.3f} / {t:.3f} = "
        f"{res['efficiency_vs_ceiling']:.3f}  (target >= 0.85)"
    )
    if "cluster_persist_iter_s" in res:
        tp = res["cluster_persist_iter_s"]
        print(
            f"cluster iteration, persisted: {tp:.3f} s (busy "
            f"{res['cluster_persist_task_s'] / (W * tp):.0%}); efficiency vs in-memory "
            f"ceiling {res['efficiency_persisted']:.3f}"
        )
    print("k-means initialisation (cost in streamed batch iterations; start's mean log-like):")
    for name, km in res["kmeans"].items():
        print(
            f"  {name:28s} {km['seconds']:7.2f} s = {km['iterations_worth']:5.2f} x "
            f"{km['iteration_s']:.2f} s; start {km['start_mean_loglike']:.5f}; by step "
            + ", ".join(f"{k} {v:.1f} s" for k, v in (km["by_step"] or {}).items())
        )
    print(
        f"1-min load average {res['load_average_start']:.2f} at start, "
        f"{res['load_average_end']:.2f} at end (well above {W} means a busy machine: rerun)"
    )
    g = 1.8e9 * 256
    ns = 1e9 * W * t / pairs
    print("\nprojection, one streamed pass over 1.8e9 rows at K = 256 (4.6e11 pairs):")
    for n in (64, 512, 4096):
        line = f"  {n:5d} CPU workers: {g * ns * 1e-9 / n / 60:8.1f} min"
        if args.gpu_ns_per_pair:
            line += f";  {n} GPU workers: {g * args.gpu_ns_per_pair * 1e-9 / n / 60:8.1f} min"
        print(line)


if __name__ == "__main__":
    main()

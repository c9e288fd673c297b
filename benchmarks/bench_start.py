"""Benchmark: what a fit costs before EM does anything useful (issue 20), for this tree and, with
``--baseline DIR`` (a copy of the code before, e.g. ``git archive core | tar -x -C DIR``), the
same figures of that tree side by side.

1. ``cluster start``: ``xd_dask.distributed.connect()`` starting a local cluster of W workers,
   until it returns and until every worker has run a first xd-dask task (a fresh process each
   time, best of ``--repeats``); this tree also with Dask's default worker start (spawn).
2. ``xd-dask fit`` of a 20,000-row, 3-feature table at K = 3 with a warm kernel cache, as the
   command does it (check, start a local cluster, fit, write the outputs; a fresh process each
   time, best of ``--repeats``): the cluster start, then everything after the cluster is up, of
   which the fit (the k-means start, EM) -- without plots and with them (the default) -- and the
   whole command's wall time.
3. ``start vs EM iterations``: for each size (rows, files, K) the k-means start's seconds over
   the median seconds of an EM iteration of the same fit (streamed from Parquet, fit.persist
   off; 20,000 rows: one file; larger: Gaia-like files of ``make_catalog``), on a cluster whose
   workers have run a fit already (best of ``--repeats``), and the start's mean log-likelihood
   (the first iteration's, at the start's parameters).

4. ``online EM's waves``: a fit at the defaults (``method = "online"``) of a 16,000-row,
   24-file catalogue (tests/test_distributed_waves.py's), persisted: seconds per wave and in
   its tasks, beside Dask's round trip of one trivial task per worker on the same cluster.

Usage: python benchmarks/bench_start.py [--baseline DIR] [--workers 2] [--repeats 3]
       [--sizes 20000:1:3,1000000:8:8,10000000:40:8] [--data-dir DIR] [--json OUT]
Quick check: python benchmarks/bench_start.py --sizes 20000:1:3 --repeats 1
The figures are wall seconds on a shared machine: read the ratios, and the 1-min load average
printed at the end (well above W: rerun when the machine is quieter).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TREE = HERE.parent
TABLE_ROWS, TABLE_K = 20_000, 3
WAVE_ROWS, WAVE_FILES = 16_000, 24  # section 4: tests/test_distributed_waves.py's catalogue


# ----------------------------------------------------------------------------- data
def write_table(out: Path, n: int = TABLE_ROWS, seed: int = 0) -> Path:
    """A 3-feature table of ``n`` rows (three overlapping clusters, per-row noise and
    correlations) as one Parquet file, and its schema TOML; returns the schema's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0.0, 0.0], [4.0, 1.0, -2.0], [-3.0, 5.0, 1.0]])
    A = rng.normal(size=(3, 3, 3)) * 0.8
    lab = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    V = means[lab] + np.einsum("nij,nj->ni", A[lab], rng.normal(size=(n, 3)))
    err = rng.uniform(0.2, 0.8, (n, 3))
    corr = rng.uniform(-0.3, 0.3, n)
    noise = rng.normal(size=(n, 3)) * err
    noise[:, 1] = corr * noise[:, 0] / err[:, 0] * err[:, 1] + np.sqrt(1 - corr**2) * noise[:, 1]
    cols = {"source_id": np.arange(n, dtype=np.int64)}
    for j in range(3):
        cols[f"x{j}"] = V[:, j] + noise[:, j]
        cols[f"x{j}_error"] = err[:, j]
    cols["x0_x1_corr"] = corr
    pq.write_table(pa.table(cols), out / "part-0000.parquet")
    schema = out.parent / f"{out.name}.toml"
    features = "".join(f'\n[[feature]]\nname = "x{j}"\nerror = "x{j}_error"\n' for j in range(3))
    schema.write_text(
        f'name = "bench_table"\nid_column = "source_id"\n{features}\n'
        '[[correlation]]\nfeatures = ["x0", "x1"]\ncolumn = "x0_x1_corr"\n'
    )
    return schema


def catalogue(root: Path, rows: int, files: int) -> tuple[Path, str]:
    """(catalogue directory, schema) for a size: the table above, or Gaia-like files."""
    if rows == TABLE_ROWS and files == 1:
        cat = root / "table-20k"
        schema = root / "table-20k.toml"
        if not schema.exists():
            write_table(cat)
        return cat, str(schema)
    cat = root / f"gaia-{rows}-{files}"
    if not cat.exists():
        from xd_dask.io.synthetic import make_catalog

        t0 = time.perf_counter()
        make_catalog(cat, rows, files, seed=0)
        print(
            f"  (wrote {rows:,} Gaia-like rows in {files} files: {time.perf_counter() - t0:.0f} s)"
        )
    return cat, "gaia_dr3"


# ----------------------------------------------------------------------------- children
def _probe() -> int:
    import xd_dask.distributed.tasks  # noqa: F401 - what a worker's first task imports

    return os.getpid()


def child_cluster(args: argparse.Namespace) -> dict:
    """Seconds until connect() returns and until every worker ran a first xd-dask task."""
    import xd_dask.distributed.cluster as cluster_mod

    if args.method == "spawn" and hasattr(cluster_mod, "START_METHOD"):
        cluster_mod.START_METHOD = None
    t0 = time.perf_counter()
    client, cluster = cluster_mod.connect(n_workers=args.workers, dashboard_address=":0")
    t_up = time.perf_counter() - t0
    client.run(_probe)
    t_ready = time.perf_counter() - t0
    t1 = time.perf_counter()
    client.close()
    cluster.close()
    return {"connect_s": t_up, "ready_s": t_ready, "close_s": time.perf_counter() - t1}


def child_fit(args: argparse.Namespace) -> dict:
    """`xd-dask fit` as the command runs it, timed by step."""
    t_start = time.perf_counter()
    from xd_dask.cli.app import load_job
    from xd_dask.jobs.prepare import fit_output, prepare_fit
    from xd_dask.jobs.runner import cluster_client, run_fit

    fixed = {
        "catalog.path": args.catalog,
        "catalog.schema": args.schema,
        "fit.n_components": args.k,
        "output.dir": args.out,
        "output.plots": bool(args.plots),
        "cluster.n_workers": args.workers,
    }
    cfg = load_job(None, {}, fixed)
    cfg.check_inputs()
    plan = prepare_fit(cfg, overwrite=True)
    t0 = time.perf_counter()
    with fit_output(plan, True), cluster_client(cfg, quiet=True) as client:
        t_up = time.perf_counter()
        outcome = run_fit(cfg, client, plan=plan)
        t_done = time.perf_counter()
    report, hist = outcome.report, outcome.model.metadata["history"]
    return {
        "before_cluster_s": t0 - t_start,
        "cluster_s": t_up - t0,
        "after_up_s": t_done - t_up,
        "fit_s": report["fit_seconds"],
        "start_s": report["init"]["seconds"],
        "start_by_step": report["init"].get("seconds_by_step"),
        "em_s": sum(h["seconds"] for h in hist),
        "iterations": len(hist),
        "start_mean_loglike": hist[0]["mean_loglike"],
        "close_s": time.perf_counter() - t_done,
    }


def child_start(args: argparse.Namespace) -> dict:
    """The k-means start against the EM iterations of the same fit, on a warmed-up cluster."""
    from xd_dask.distributed import FitConfig, connect, fit_catalog

    client, cluster = connect(n_workers=args.workers, dashboard_address=None)
    try:
        cfg = dict(catalog=args.catalog, schema=args.schema, n_components=args.k, seed=1)
        fit_catalog(FitConfig(**cfg, max_iter=1), client)  # workers run their first tasks
        runs = []
        for _ in range(args.repeats):
            model = fit_catalog(FitConfig(**cfg, max_iter=args.iterations, tol=0.0), client)
            md = model.metadata
            runs.append(
                {
                    "start_s": md["init"]["seconds"],
                    "start_by_step": md["init"].get("seconds_by_step"),
                    "iteration_s": statistics.median(h["seconds"] for h in md["history"]),
                    "start_mean_loglike": md["history"][0]["mean_loglike"],
                }
            )
    finally:
        client.close()
        cluster.close()
    best = min(runs, key=lambda r: r["start_s"])
    best["iteration_s"] = min(r["iteration_s"] for r in runs)
    best["start_iterations"] = best["start_s"] / best["iteration_s"]
    return best


def _noop(x):
    return x


def child_waves(args: argparse.Namespace) -> dict:
    """Online EM at its defaults on a small catalogue (persisted, strata waves): seconds per
    wave and in its tasks, beside Dask's own round trip of one trivial task per worker."""
    from xd_dask.distributed import FitConfig, connect, fit_catalog

    client, cluster = connect(n_workers=args.workers, dashboard_address=None)
    try:
        workers = list(client.nthreads())
        trips = []
        for i in range(200):
            t0 = time.perf_counter()
            futs = [
                client.submit(_noop, j, key=("trip", i, j), workers=w)
                for j, w in enumerate(workers)
            ]
            client.gather(futs)
            trips.append(time.perf_counter() - t0)
        cfg = FitConfig(
            catalog=args.catalog, schema=args.schema, n_components=args.k, seed=1,
            holdout_rows=0.2, method="online",
        )  # fmt: skip
        t0 = time.perf_counter()
        model = fit_catalog(cfg, client)
        seconds = time.perf_counter() - t0
    finally:
        client.close()
        cluster.close()
    hist = model.metadata["history"][1:]
    return {
        "fit_s": seconds,
        "waves": len(hist),
        "epochs": hist[-1].get("epoch"),
        "wave_s": statistics.median(h["seconds"] for h in hist),
        "wave_task_s": statistics.median(h.get("task_seconds") or 0.0 for h in hist),
        "round_trip_s": statistics.median(trips[20:]),
    }


CHILDREN = {"cluster": child_cluster, "fit": child_fit, "start": child_start, "waves": child_waves}


def run_child(tree: Path, kind: str, **kw) -> dict:
    """Run one measurement in a fresh process that imports xd_dask from ``tree``."""
    cmd = [sys.executable, str(HERE / "bench_start.py"), "--child", kind]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    # cwd: the tree. Worker processes are forked from a server started with `python -c`, whose
    # sys.path begins with the working directory: run from another checkout, the workers would
    # import ITS xd_dask, whatever PYTHONPATH says (the before/after comparison of worker-side
    # code then compares a tree with itself)
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{kind} in {tree} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def best_of(n: int, key: str, tree: Path, kind: str, **kw) -> dict:
    runs = [run_child(tree, kind, **kw) for _ in range(n)]
    return min(runs, key=lambda r: r[key])


# ----------------------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", default=None, help="source tree of the code before")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=3, help="EM iterations per start fit")
    ap.add_argument("--sizes", default="20000:1:3,1000000:8:8,10000000:40:8", help="rows:files:K")
    ap.add_argument("--data-dir", default=None, help="catalogue cache (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--waves", type=int, default=1, help="section 4 (0: skip it)")
    # a child measurement (internal)
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    for name in ("method", "catalog", "schema", "out"):
        ap.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=TABLE_K, help=argparse.SUPPRESS)
    ap.add_argument("--plots", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import logging

        logging.basicConfig(level=logging.ERROR)
        print(json.dumps(CHILDREN[args.child](args)))
        return

    trees = {"after": TREE}
    if args.baseline:
        trees = {"before": Path(args.baseline).resolve(), "after": TREE}
    tmp = tempfile.TemporaryDirectory(prefix="xd-bench-start-")
    root = Path(args.data_dir or tmp.name).resolve()  # children run in their tree
    root.mkdir(parents=True, exist_ok=True)
    W, R = args.workers, args.repeats
    res: dict = {"workers": W, "repeats": R, "load_average_start": os.getloadavg()[0]}

    # 1. cluster start
    res["cluster"] = {}
    variants = [(name, tree, "default") for name, tree in trees.items()]
    variants.insert(len(variants) - 1, ("after, Dask's spawn", TREE, "spawn"))
    for name, tree, method in variants:
        res["cluster"][name] = best_of(R, "ready_s", tree, "cluster", method=method, workers=W)

    # 2. xd-dask fit of the 20,000-row table (one untimed fit per tree first: a warm cache)
    cat, schema = catalogue(root, TABLE_ROWS, 1)
    res["fit_table"] = {}
    for name, tree in trees.items():
        out = root / f"fit-{name}"
        kw = dict(catalog=cat, schema=schema, k=TABLE_K, out=out, workers=W)
        run_child(tree, "fit", plots=1, **kw)
        res["fit_table"][name] = {
            "plots off": best_of(R, "after_up_s", tree, "fit", plots=0, **kw),
            "plots on": best_of(R, "after_up_s", tree, "fit", plots=1, **kw),
        }
        t0 = time.perf_counter()
        cmd = [
            str(Path(sys.executable).with_name("xd-dask")),
            *("fit", "--catalog", str(cat), "--schema", schema, "-k", str(TABLE_K)),
            *("--out", str(out), "--overwrite", "--n-workers", str(W)),
        ]
        walls = []
        for _ in range(R):
            t0 = time.perf_counter()
            env = dict(os.environ, PYTHONPATH=str(tree))
            subprocess.run(cmd, env=env, cwd=tree, check=True, capture_output=True)
            walls.append(time.perf_counter() - t0)
        res["fit_table"][name]["command_wall_s"] = min(walls)

    # 3. start vs EM iterations at each size
    res["sizes"] = []
    for spec in args.sizes.split(","):
        rows, files, K = (int(x) for x in spec.split(":"))
        cat, schema = catalogue(root, rows, files)
        entry = {"rows": rows, "files": files, "K": K}
        for name, tree in trees.items():
            entry[name] = run_child(
                tree,
                "start",
                catalog=cat,
                schema=schema,
                k=K,
                workers=W,
                repeats=R,
                iterations=args.iterations,
            )
        res["sizes"].append(entry)
        print_size(entry, trees)
    # 4. online EM's waves on a small catalogue against Dask's round trip
    if args.waves:
        cat = root / f"waves-{WAVE_ROWS}-{WAVE_FILES}"
        if not cat.exists():
            from xd_dask.io.synthetic import make_catalog

            make_catalog(cat, WAVE_ROWS, WAVE_FILES, seed=11)
        res["waves"] = {
            name: run_child(tree, "waves", catalog=cat, schema="gaia_dr3", k=8, workers=W)
            for name, tree in trees.items()
        }
    res["load_average_end"] = os.getloadavg()[0]
    report(res, trees)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


def print_size(entry: dict, trees: dict) -> None:
    for name in trees:
        r = entry[name]
        by = ", ".join(f"{k} {v:.2f}" for k, v in (r.get("start_by_step") or {}).items())
        print(
            f"  {entry['rows']:>11,} rows, {entry['files']:>3} files, K = {entry['K']:<3} {name:6s}"
            f" start {r['start_s']:7.2f} s = {r['start_iterations']:5.2f} x"
            f" {r['iteration_s']:.3f} s iteration; start mean ll {r['start_mean_loglike']:.5f}"
            f"  ({by})",
            flush=True,
        )


def report(res: dict, trees: dict) -> None:
    names = list(trees)
    col = "".join(f"{n:>12s}" for n in names)
    W, R = res["workers"], res["repeats"]
    print(f"\n1. cluster start, {W} workers (s, best of {R})")
    print(f"  {'':52s}{'connect':>10s}{'ready':>10s}")
    for name, r in res["cluster"].items():
        print(f"  {name:52s}{r['connect_s']:10.2f}{r['ready_s']:10.2f}")
    print(
        f"\n2. xd-dask fit, {TABLE_ROWS:,} rows x 3 features, K = {TABLE_K}, warm kernel cache"
        f" (s, best of {R})"
    )
    print(f"  {'':52s}{col}")
    rows = [
        ("cluster start", "plots off", "cluster_s"),
        ("after the cluster is up, no plots", "plots off", "after_up_s"),
        ("  of which the fit", "plots off", "fit_s"),
        ("    k-means start", "plots off", "start_s"),
        ("    EM iterations", "plots off", "em_s"),
        ("after the cluster is up, with plots (default)", "plots on", "after_up_s"),
    ]
    for label, variant, key in rows:
        vals = "".join(f"{res['fit_table'][n][variant][key]:12.2f}" for n in names)
        print(f"  {label:52s}{vals}")
    vals = "".join(f"{res['fit_table'][n]['command_wall_s']:12.2f}" for n in names)
    print(f"  {'the whole command (wall, with plots)':52s}{vals}")
    iters = "".join(f"{res['fit_table'][n]['plots off']['iterations']:12d}" for n in names)
    print(f"  {'EM iterations run':52s}{iters}")
    lls = "".join(f"{res['fit_table'][n]['plots off']['start_mean_loglike']:12.5f}" for n in names)
    print(f"  {'start mean log-likelihood':52s}{lls}")
    print(f"\n3. the k-means start in EM iterations (streamed, warm cluster, best of {R})")
    print(
        f"  {'rows':>11s} {'files':>5s} {'K':>3s}  "
        + "  ".join(f"{n + ': start s, iterations, start ll':>44s}" for n in names)
    )
    for e in res["sizes"]:
        cells = "  ".join(
            f"{e[n]['start_s']:12.2f} {e[n]['start_iterations']:12.2f} "
            f"{e[n]['start_mean_loglike']:18.5f}"
            for n in names
        )
        print(f"  {e['rows']:>11,} {e['files']:>5d} {e['K']:>3d}  {cells}")
    if "waves" in res:
        print(
            f"\n4. online EM at its defaults, {WAVE_ROWS:,} rows in {WAVE_FILES} files, K = 8, "
            f"persisted, {W} workers (one run)"
        )
        rows = [
            ("waves (epochs)", lambda r: f"{r['waves']} ({r['epochs']})"),
            ("fit (s)", lambda r: f"{r['fit_s']:.2f}"),
            ("per wave (ms)", lambda r: f"{r['wave_s'] * 1e3:.1f}"),
            ("  in the wave's tasks (ms, summed)", lambda r: f"{r['wave_task_s'] * 1e3:.1f}"),
            ("Dask round trip, 1 trivial task/worker (ms)",
             lambda r: f"{r['round_trip_s'] * 1e3:.1f}"),
            ("per wave / round trip", lambda r: f"{r['wave_s'] / r['round_trip_s']:.2f}"),
        ]  # fmt: skip
        for label, fmt in rows:
            print(f"  {label:52s}" + "".join(f"{fmt(res['waves'][n]):>12s}" for n in names))
    print(
        f"\n1-min load average {res['load_average_start']:.2f} at start, "
        f"{res['load_average_end']:.2f} at end (well above {W}: a busy machine, rerun)"
    )


if __name__ == "__main__":
    main()

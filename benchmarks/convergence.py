"""How many batch-EM iterations real catalogues need to settle, and how far from settled a fit
stops at a given iteration budget: the measurements behind the [fit] tol / max_iter defaults.

For each real data set and K it runs the in-memory XDGMM (the same fitting loop as the
distributed fit) for ``--iterations`` iterations with tol = 0 and prints, for each tolerance, the
first iteration at which the change of the mean log-likelihood per row fell below it, and the
last change at the old and the new budget.

    python benchmarks/convergence.py                         # the project's real Gaia files
    python benchmarks/convergence.py --hipparcos DIR SCHEMA  # plus an ingested hip2 catalogue
"""

from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

import numpy as np

from xd_dask.estimator import XDGMM
from xd_dask.io import load_schema, read_partition

#: The shared real-data samples: ``../shared/data/gaia`` beside the checkout, else /work/shared.
GAIA = next(
    (
        p
        for p in (
            Path(__file__).resolve().parents[2] / "shared" / "data" / "gaia",
            Path("/work/shared/data/gaia"),
        )
        if p.is_dir()
    ),
    Path("../shared/data/gaia"),
)
TOLS = (1e-3, 1e-4, 1e-5, 1e-6)


def _rows(paths: list[str], schema) -> tuple[np.ndarray, np.ndarray]:
    blocks = [read_partition(p, schema, on_bad="drop") for p in sorted(paths)]
    return np.concatenate([b.X for b in blocks]), np.concatenate([b.X_cov for b in blocks])


def _first_below(changes: np.ndarray, tol: float) -> int | None:
    """1-based iteration at which the loop (tol) would stop: the first |change| < tol."""
    hit = np.flatnonzero(np.abs(changes) < tol)
    return int(hit[0]) + 2 if hit.size else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--ks", default="4,6,8")
    ap.add_argument("--hipparcos", nargs=2, metavar=("DIR", "SCHEMA"))
    ap.add_argument("--old", default="50,1e-6", help="old max_iter,tol")
    ap.add_argument("--new", default="200,1e-4", help="new max_iter,tol")
    args = ap.parse_args()
    sets = [
        (Path(p).stem, [p], load_schema("gaia_dr3"))
        for p in sorted(glob.glob(str(GAIA / "*.parquet")))
    ]
    if args.hipparcos:
        d, s = args.hipparcos
        sets.append(("hip2", sorted(glob.glob(f"{d}/*.parquet")), load_schema(s)))
    old_it, old_tol = int(args.old.split(",")[0]), float(args.old.split(",")[1])
    new_it, new_tol = int(args.new.split(",")[0]), float(args.new.split(",")[1])
    if args.iterations < max(old_it, new_it):
        ap.error(f"--iterations must be at least the larger budget ({max(old_it, new_it)})")
    print(
        f"{'data':24s} {'n':>7s} {'K':>2s} "
        + " ".join(f"{'it@' + format(t, 'g'):>9s}" for t in TOLS)
        + f" {'old: stop':>9s} {'chg@stop':>9s} {'new: stop':>9s} {'chg@stop':>9s} {'s/it':>6s}"
    )
    tally = {"old": [], "new": []}
    for name, paths, schema in sets:
        X, S = _rows(paths, schema)
        for K in (int(k) for k in args.ks.split(",")):
            t0 = time.perf_counter()
            xd = XDGMM(K, max_iter=args.iterations, tol=0.0, random_state=0).fit(X, S)
            sec = (time.perf_counter() - t0) / args.iterations
            ll = np.array([h["mean_loglike"] for h in xd.history_])
            ch = np.diff(ll)  # ch[i] = ll[i+1] - ll[i]: the change seen at iteration i + 2
            its = [_first_below(ch, t) for t in TOLS]
            cells = []
            for which, (budget, tol) in (("old", (old_it, old_tol)), ("new", (new_it, new_tol))):
                stop = _first_below(ch[: budget - 1], tol)
                tally[which].append(stop)
                stop = stop or budget
                cells.append(f"{stop:>8d}{'' if stop < budget else '*'} {ch[stop - 2]:9.2e}")
            print(
                f"{name[:24]:24s} {X.shape[0]:7d} {K:2d} "
                + " ".join(f"{'>' + str(args.iterations) if i is None else i:>9}" for i in its)
                + f" {' '.join(cells)} {sec:6.3f}"
            )
    for which, (budget, tol) in (("old", (old_it, old_tol)), ("new", (new_it, new_tol))):
        done = [s for s in tally[which] if s is not None]
        print(
            f"{which} defaults (max_iter {budget}, tol {tol:g}): {len(done)} of "
            f"{len(tally[which])} fits converged"
            + (f", in {min(done)}-{max(done)} iterations" if done else "")
            + " (*: stopped at max_iter; chg@stop: the last change, nats/row)"
        )


if __name__ == "__main__":
    main()

"""Benchmark: what a fit's checkpoint costs per step as its history grows.

A fit checkpoints after every iteration / wave (``output.checkpoint``, on by default for CLI
jobs); an online fit of a large catalogue runs thousands of waves. For histories of 100 to
20,000 entries (online-EM-like entries, K = 16, D = 7 parameters, and with a previous set of
parameters as the robust check keeps), this saves the fit so far once, then times ten more
steps of one new entry each (median, milliseconds per checkpoint) and checks that the
checkpoint reloads the same history. With ``--baseline DIR`` (a source tree of the code before,
e.g. ``git archive <rev> | tar -x -C DIR``) the same figures of that tree's
``xd_dask/distributed/checkpoint.py`` side by side.

Usage: python benchmarks/bench_checkpoint.py [--baseline DIR] [--lengths 100,1000,5000,20000]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from xd_dask.distributed import checkpoint
from xd_dask.optim.steps import LoopState
from xd_dask.params import Params

K, D = 16, 7
ENTRY = {
    "iteration": 0,
    "epoch": 0,
    "wave": 3,
    "wave_mean_loglike": -16.89812051470006,
    "step": 0.05,
    "rows": 640,
    "partitions": list(range(24)),
    "stratum": [3, 20],
    "task_seconds": 0.0031,
    "reseeded": [],
    "seconds": 0.017,
}


def _module_of(tree: Path):
    """``checkpoint`` of the source tree ``tree`` (its other imports: this tree's package)."""
    path = tree / "xd_dask" / "distributed" / "checkpoint.py"
    spec = importlib.util.spec_from_file_location("checkpoint_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def per_checkpoint_ms(mod, n: int, steps: int = 10) -> float:
    """Median milliseconds of one checkpoint after ``n`` history entries."""
    rng = np.random.default_rng(0)
    p = Params(np.full(K, 1 / K), rng.normal(size=(K, D)), np.stack([np.eye(D)] * K))
    state = LoopState(p, "online-em", history=[dict(ENTRY, iteration=i) for i in range(n)])
    state.previous = p
    config, manifest = {"seed": 1}, {"partitions": [f"part-{i}" for i in range(24)]}
    with tempfile.TemporaryDirectory() as d:
        mod.save_checkpoint(d, state, config, manifest)  # the fit so far
        times = []
        for i in range(steps):
            state.history.append(dict(ENTRY, iteration=n + i))
            t0 = time.perf_counter()
            mod.save_checkpoint(d, state, config, manifest)
            times.append(time.perf_counter() - t0)
        if mod.load_checkpoint(d)[0].history != state.history:
            raise AssertionError("the checkpoint did not reload its history")
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=None, help="source tree of the code before")
    ap.add_argument("--lengths", default="100,1000,5000,20000", help="history entries")
    args = ap.parse_args()
    trees = {"this tree": checkpoint}
    if args.baseline:
        trees = {"before": _module_of(Path(args.baseline))} | trees
    print("checkpoint cost per step, K = 16, D = 7 (ms, median of 10 steps)")
    print(f"{'history entries':>16} | " + " | ".join(f"{name:>10}" for name in trees))
    for n in (int(x) for x in args.lengths.split(",")):
        ms = [per_checkpoint_ms(mod, n) for mod in trees.values()]
        ratio = f"   ({ms[0] / ms[-1]:.1f}x)" if len(ms) > 1 else ""
        print(f"{n:>16} | " + " | ".join(f"{v:>10.1f}" for v in ms) + ratio)


if __name__ == "__main__":
    main()

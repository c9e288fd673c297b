"""The starts of a fit on a catalogue: k-means (:mod:`xd_dask.optim.kmeans`, its passes mapped over
the partitions) and, for PROJECTED catalogues, the method of moments (:mod:`xd_dask.optim.init`).

k-means: one ``xd-kmeans-sample`` pass (column moments and a seeded sample of every partition),
k-means on the client, then ``max_iter`` Lloyd passes (``xd-kmeans``). Cost: the sample pass and
one Lloyd pass read the catalogue twice and run no EM kernel; a catalogue of at most
``sample_size`` rows is read once (the sample is every row: the client runs the Lloyd passes on
it). ``benchmarks/bench_start.py`` prints the cost against the fit's iterations at several sizes.
The result is deterministic for a fixed seed and partitioning, and equals the start of an
in-memory fit of a one-partition catalogue of the rows.

Method of moments: two ``xd-moments`` passes of small sums (the mean, then the dispersion
tensor's normal equations about it), the same start as an in-memory fit of the same rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from xd_dask.config import key
from xd_dask.distributed.passes import PassRunner
from xd_dask.distributed.start_tasks import (
    LloydRequest,
    MomentRequest,
    SampleRequest,
    kmeans_lloyd,
    kmeans_sample,
    moments,
)
from xd_dask.optim.init import moment_solution, moment_start
from xd_dask.optim.kmeans import KMeansSums, SampleMoments, default_sample_size, kmeans_start
from xd_dask.params import Params
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["KMeansInit", "default_sample_size", "kmeans_init", "moment_init", "sample_pass"]


@dataclass
class KMeansInit:
    """Initial mixture parameters and how they were found (``info`` goes into the metadata)."""

    params: Params
    info: dict


def sample_pass(runner: PassRunner, seed: int, fraction: float) -> Any:
    """The k-means sample pass (:class:`~xd_dask.distributed.tasks.Partial` of
    :class:`~xd_dask.optim.kmeans.SampleMoments`), shared by every K inside
    :func:`xd_dask.distributed.passes.shared_reads`."""
    return runner.run_shared("kmeans-sample", (0,), kmeans_sample, SampleRequest(seed, fraction))


def kmeans_init(
    runner: PassRunner,
    n_components: int,
    seed: int,
    *,
    max_iter: int = key("fit.kmeans_iter").default,
    tol: float = key("fit.kmeans_tol").default,
    sample_size: int | None = None,
    reg_covar: float = key("fit.reg_covar").default,
    trim: float = 0.0,
) -> tuple[KMeansInit, Any]:
    """Initial parameters by k-means over the partitions of ``runner``
    (:func:`xd_dask.optim.kmeans.kmeans_start`); returns the start and the sample pass's result
    (the background's box is drawn from the same sample)."""
    passes: dict[str, Any] = {}

    def sample(fraction: float) -> tuple[SampleMoments, int]:
        passes["sample"] = res = sample_pass(runner, seed, fraction)
        return res.payload, res.n_used

    def lloyd(i: int, centres, col_mean, col_scale, d2_max) -> tuple[KMeansSums, int]:
        req = LloydRequest(centres, col_mean, col_scale, float(d2_max))
        part = runner.run("kmeans", (i,), kmeans_lloyd, req)
        return part.payload, part.n_used

    t0 = time.perf_counter()
    params, info = kmeans_start(
        sample,
        lloyd,
        runner.manifest.n_rows,
        n_components,
        seed,
        max_iter=max_iter,
        tol=tol,
        sample_size=sample_size,
        reg_covar=reg_covar,
        trim=trim,
    )
    info["seconds"] = time.perf_counter() - t0
    return KMeansInit(params, info), passes["sample"]


def moment_init(runner: PassRunner, n_components: int, seed: int, reg_covar: float) -> KMeansInit:
    """Initial parameters of a projected catalogue by the method of moments (module docstring):
    pass 1 sums R^T R and R^T x (the mean), pass 2 the dispersion's normal equations about it;
    :func:`xd_dask.optim.init.moment_start` draws the K components with ``seed``."""
    t0 = time.perf_counter()
    first = runner.run("moments", (0,), moments, MomentRequest(None)).payload
    mean, _ = moment_solution(first)
    second = runner.run("moments", (1,), moments, MomentRequest(mean)).payload
    mean, Sigma = moment_solution(first, second)
    params = moment_start(mean, Sigma, n_components, int(seed), reg_covar)
    info = {
        "method": "moments",
        "rows": int(first.n),
        "mean": mean.tolist(),
        "dispersion": Sigma.tolist(),
        "seconds": time.perf_counter() - t0,
    }
    log.info("moment init: mean %s over %d rows", np.array2string(mean, precision=4), first.n)
    return KMeansInit(params, info)

"""Worker-side task functions of a fit's start (:mod:`xd_dask.distributed.kmeans`): the k-means
sample pass (``xd-kmeans-sample``), Lloyd passes (``xd-kmeans``) and the method of moments'
passes (``xd-moments``) of a projected catalogue. Each reads a partition (or its persisted
block) as :mod:`xd_dask.distributed.tasks` does and returns a small :class:`~xd_dask.
distributed.tasks.Partial`; the passes themselves are run by :class:`~xd_dask.distributed.
passes.PassRunner`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from xd_dask.distributed.tasks import Partial, TaskOptions, _backend, _block, _partial
from xd_dask.optim.init import MomentSums, moment_sums
from xd_dask.optim.kmeans import cluster_sums, sample_moments, standardise

__all__ = [
    "LloydRequest",
    "MomentRequest",
    "SampleRequest",
    "kmeans_lloyd",
    "kmeans_sample",
    "moments",
]


@dataclass(frozen=True)
class SampleRequest:
    """k-means' sample pass: a seeded Bernoulli(``fraction``) sample of each partition."""

    seed: int
    fraction: float


def kmeans_sample(source: Any, opts: TaskOptions, params: None, req: SampleRequest) -> Partial:
    """Column moments of a partition and its seeded sample (:func:`xd_dask.optim.kmeans.
    sample_moments`, ``xd-kmeans-sample``)."""
    t0 = time.perf_counter()
    _backend(opts)
    blk = _block(source, opts)
    mom = sample_moments(blk.X, req.seed, req.fraction, blk.pid)
    return _partial(blk, mom, blk.n_rows, t0)


@dataclass(frozen=True)
class LloydRequest:
    """One Lloyd pass: centres (K, D) in standardised units, the standardisation, the trim."""

    centres: np.ndarray
    col_mean: np.ndarray
    col_scale: np.ndarray
    d2_max: float


def kmeans_lloyd(source: Any, opts: TaskOptions, params: None, req: LloydRequest) -> Partial:
    """One Lloyd pass over a partition: :func:`xd_dask.optim.kmeans.cluster_sums` of its
    standardised rows (``xd-kmeans``)."""
    t0 = time.perf_counter()
    _backend(opts)
    blk = _block(source, opts)
    Z = standardise(blk.X, req.col_mean, req.col_scale)
    return _partial(blk, cluster_sums(Z, req.centres, req.d2_max), blk.n_rows, t0)


@dataclass(frozen=True)
class MomentRequest:
    """The method of moments' pass: first (``mean`` None) or second (about ``mean``)."""

    mean: np.ndarray | None = None


def moments(source: Any, opts: TaskOptions, params: None, req: MomentRequest) -> Partial:
    """Method-of-moments sums of a partition's projected rows (``xd-moments``; the start of a
    projected fit, :mod:`xd_dask.optim.init`)."""
    t0 = time.perf_counter()
    _backend(opts)
    blk = _block(source, opts)
    if blk.R is None:
        raise ValueError(f"{blk.path}: the method of moments needs a schema with a projection")
    if blk.n_rows == 0:
        sums = MomentSums.zeros(int(blk.R.shape[2]))
    else:
        sums = moment_sums(blk.X, blk.X_cov, blk.R, req.mean)
    return _partial(blk, sums, blk.n_rows, t0)

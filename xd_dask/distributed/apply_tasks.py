"""Worker-side task functions that apply a model to a catalogue: ``xd-loglike`` (the
held-out score and ``xd-dask score``, background included) and ``xd-posterior`` (per-row
posteriors written beside the catalogue). Each reads a partition (or its persisted block) as
:mod:`xd_dask.distributed.tasks` does and returns a small :class:`~xd_dask.distributed.tasks.
Partial`; :mod:`xd_dask.distributed.score` runs the passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from xd_dask.distributed.manifest import Partition
from xd_dask.distributed.tasks import (
    Partial,
    TaskOptions,
    _backend,
    _block,
    _filesystem,
    _kernel_error,
    _partial,
)
from xd_dask.io.writers import part_path, posterior_columns, with_status, write_table
from xd_dask.kernels import NotPositiveDefiniteError, posterior, row_log_likelihood
from xd_dask.kernels._common import to_numpy
from xd_dask.params import Params

__all__ = ["LogLikeSum", "PosteriorRequest", "ScoreRequest", "loglike", "posterior_write"]


@dataclass
class LogLikeSum:
    """Sum of per-row log-likelihoods and the number of rows."""

    ll: float
    n: int

    def __add__(self, other: LogLikeSum) -> LogLikeSum:
        return LogLikeSum(self.ll + other.ll, self.n + other.n)


@dataclass(frozen=True)
class ScoreRequest:
    """``out_dir`` (absolute; None: no files): also write ``score-<pid>.parquet`` there."""

    out_dir: str | None = None


def loglike(source: Any, opts: TaskOptions, params: Params, req: ScoreRequest) -> Partial:
    """Total log-likelihood of a partition under ``params`` (background included); with
    ``req.out_dir`` also its per-row values (columns: the id column under its own name,
    ``log_likelihood``; valid rows)."""
    t0 = time.perf_counter()
    backend = _backend(opts)
    blk = _block(source, opts)
    try:
        ll = to_numpy(
            row_log_likelihood(blk.X, blk.X_cov, params, R=blk.R, backend=backend, check=False)
        )
    except NotPositiveDefiniteError as err:
        raise _kernel_error(blk, opts, None, err) from None
    files = {}
    if req.out_dir is not None:
        path = part_path(req.out_dir, "score", blk.pid)
        cols = {opts.id_name: blk.ids.astype(np.int64), "log_likelihood": ll}
        files[path] = write_table(cols, path)
    payload = LogLikeSum(float(np.sum(ll)), int(ll.shape[0]))
    return _partial(blk, payload, ll.shape[0], t0, files=files)


@dataclass(frozen=True)
class PosteriorRequest:
    """Where and what a posterior pass writes: ``out_dir`` (absolute), the model's
    ``feature_names``, column ``groups`` (:data:`xd_dask.io.writers.POSTERIOR_GROUPS`) and the
    ``top_k`` components' own posteriors."""

    out_dir: str
    feature_names: tuple[str, ...]
    groups: tuple[str, ...] = ("mean", "cov", "map")
    top_k: int = 0


def posterior_write(
    source: Any, opts: TaskOptions, params: Params, req: PosteriorRequest
) -> Partial:
    """Write a partition's deconvolved posteriors to ``<out_dir>/posterior-<pid>.parquet``,
    atomically (``xd-posterior``): one row per input row, the columns of
    :func:`xd_dask.io.writers.posterior_columns` and ``status`` ("ok", or the reason a row was
    dropped under ``on_bad="drop"``, its values null)."""
    t0 = time.perf_counter()
    backend = _backend(opts)
    blk = _block(source, opts)
    try:
        post = posterior(
            blk.X,
            blk.X_cov,
            params,
            R=blk.R,
            top_k=req.top_k,
            summary=True,
            return_resp="resp" in req.groups,
            backend=backend,
            check=False,
        ).to_numpy()
    except NotPositiveDefiniteError as err:
        raise _kernel_error(blk, opts, None, err) from None
    cols = posterior_columns(post, blk.ids, opts.id_name, list(req.feature_names), req.groups)
    reread = None
    if isinstance(source, Partition):
        fs, path = _filesystem(source.path)
        reread = (path, source.row_groups, opts.schema, np.dtype(opts.dtype), fs)
    table = with_status(cols, opts.id_name, sum(blk.dropped.values()), reread)
    out = part_path(req.out_dir, "posterior", blk.pid)
    files = {out: write_table(table, out)}
    return _partial(
        blk, LogLikeSum(0.0, int(post.mean.shape[0])), post.mean.shape[0], t0, files=files
    )

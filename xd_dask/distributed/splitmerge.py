"""Split-and-merge on the cluster: the criteria pass (``xd-moves`` tasks + tree reduction).

One pass over the catalogue at the converged parameters returns the sums of
:class:`xd_dask.optim.splitmerge.MoveStats` (K x K + 3 K numbers, whatever the number of rows),
from which the client ranks the candidate moves; the moves themselves (partial EM, full EM)
are ordinary ``xd-estep`` passes of the one fitting loop. Online EM and Adam get the stochastic
variant (:class:`xd_dask.optim.splitmerge.WaveSplitMerge`): the pass then covers the wave's
partitions, or its hash stratum of every partition (the rows its ``xd-estep`` pass used).
Public: :func:`moves_task`, :func:`pass_moves`.
"""

from __future__ import annotations

import time
from typing import Any

from xd_dask.distributed.tasks import (
    Block,
    Params,
    Partial,
    TaskOptions,
    _select_rows,
    _stratum_rows,
    _subsample_rows,
    read_block,
)
from xd_dask.optim.loop import Batch, Mixture
from xd_dask.optim.splitmerge import MoveStats, SplitMerge, WaveSplitMerge, move_stats

__all__ = ["moves_task", "pass_moves"]


def moves_task(
    source: Any,
    params: Params,
    opts: TaskOptions,
    background: Any = None,
    subsample: tuple[float, int, int] | None = None,
    stratum: tuple[int, int, int, int] | None = None,
) -> Partial:
    """The split-and-merge criteria's sums over one partition (``xd-moves``), or over the rows
    ``subsample`` / ``stratum`` select (as in :func:`xd_dask.distributed.tasks.estep`); the
    block's projections ``R`` are used when it has them."""
    t0 = time.perf_counter()
    if opts.gpu:
        raise ValueError("split-and-merge runs on CPU workers only (cluster.gpu = false)")
    blk = source if isinstance(source, Block) else read_block(source, opts)
    rows = _select_rows(
        None if subsample is None else _subsample_rows(blk, *subsample),
        _stratum_rows(blk, opts, stratum),
    )
    X, S, R = blk.X, blk.X_cov, getattr(blk, "R", None)
    if rows is not None:
        X, S, R = X[rows], S[rows], None if R is None else R[rows]
    p = Mixture(params.weights, params.means, params.covariances, background)
    ms = move_stats(X, S, p, R=R, backend=opts.backend, check=False)
    return Partial(ms, 1, blk.n_read, X.shape[0], dict(blk.dropped), time.perf_counter() - t0)


def pass_moves(runner: Any, cfg: Any, n_waves: int = 1) -> SplitMerge | WaveSplitMerge:
    """The split-and-merge controller of a fit (``cfg``: FitConfig; ``n_waves`` per epoch for
    online EM / Adam) whose criteria run as one ``xd-moves`` pass of ``runner``
    (:class:`xd_dask.distributed.passes.PassRunner`) over every row, or over a wave's rows."""
    if cfg.gpu:
        raise ValueError("fit.split_merge runs on CPU workers only (cluster.gpu = false)")
    calls = [0]
    sub = None if cfg.subsample is None else (float(cfg.subsample), int(cfg.seed))

    def criteria(params: Mixture, batch: Batch | None = None) -> MoveStats:
        calls[0] += 1
        subsample = stratum = None
        if batch is not None and sub is not None:
            subsample = (*sub, batch.epoch - 1)
        if batch is not None and batch.stratum is not None:
            stratum = (*batch.stratum, int(cfg.seed), batch.epoch - 1)
        part = runner.run(
            "moves",
            (calls[0],),
            moves_task,
            pids=None if batch is None else batch.units,
            shared=(Params(params.weights, params.means, params.covariances),),
            extra=(runner.opts, params.background, subsample, stratum),
        )
        return part.payload

    if cfg.method != "em":
        return WaveSplitMerge(
            criteria,
            every=int(cfg.split_merge_every or n_waves),
            trial_waves=int(cfg.split_merge_trial_waves),
            candidates=int(cfg.split_merge_candidates),
            max_moves=int(cfg.split_merge_max_moves),
            tol=float(cfg.tol),
            partial_iter=int(cfg.split_merge_partial_iter),
            reg_covar=float(cfg.reg_covar),
        )
    return SplitMerge(
        criteria,
        candidates=int(cfg.split_merge_candidates),
        partial_iter=int(cfg.split_merge_partial_iter),
        max_moves=int(cfg.split_merge_max_moves),
        tol=float(cfg.tol),
    )

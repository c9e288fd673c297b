"""Split-and-merge on the cluster: the criteria pass (``xd-moves`` tasks + tree reduction).

One pass over the catalogue at the converged parameters returns the sums of
:class:`xd_dask.optim.splitmerge.MoveStats` (K x K + 3 K numbers, whatever the number of rows),
from which the client ranks the candidate moves; the moves themselves (partial EM, full EM)
are ordinary ``xd-estep`` passes of the one fitting loop. Methods on waves (online EM, Adam) get
the stochastic variant (:class:`xd_dask.optim.splitmerge.WaveSplitMerge`): the pass then covers
the wave's partitions, or its hash stratum of every partition (the rows its ``xd-estep`` pass
used). Public: :func:`moves_task`, :func:`pass_moves`.
"""

from __future__ import annotations

import time
from typing import Any

from xd_dask.distributed.tasks import Partial, Rows, TaskOptions, _block, selected
from xd_dask.optim.splitmerge import MoveStats, SplitMerge, WaveSplitMerge, move_stats
from xd_dask.optim.steps import Batch
from xd_dask.params import Params

__all__ = ["moves_task", "pass_moves"]


def moves_task(source: Any, opts: TaskOptions, params: Params, rows: Rows) -> Partial:
    """The split-and-merge criteria's sums over the ``rows`` of one partition (``xd-moves``);
    the block's projections ``R`` are used when it has them. On GPU workers the rows stay on
    the device and the ``"moves"`` kernel runs there (only the K x K + 3 K sums come back)."""
    t0 = time.perf_counter()
    blk = _block(source, opts)
    X, S, R, _ = selected(blk, opts, rows)
    ms = move_stats(X, S, params, R=R, backend=opts.backend, check=False)
    return Partial(ms, 1, blk.n_read, X.shape[0], dict(blk.dropped), time.perf_counter() - t0)


def pass_moves(
    runner: Any, cfg: Any, full_batch: bool, n_waves: int = 1
) -> SplitMerge | WaveSplitMerge:
    """The split-and-merge controller of a fit (``cfg``: FitConfig; ``n_waves`` per epoch on
    waves) whose criteria run as one ``xd-moves`` pass of ``runner``
    (:class:`xd_dask.distributed.passes.PassRunner`) over every row, or over a wave's rows."""
    calls = [0]
    sub = None if cfg.subsample is None else (float(cfg.subsample), int(cfg.seed))

    def criteria(params: Params, batch: Batch | None = None) -> MoveStats:
        calls[0] += 1
        subsample = stratum = None
        if batch is not None and sub is not None:
            subsample = (*sub, batch.drawn)
        if batch is not None and batch.stratum is not None:
            stratum = (*batch.stratum, int(cfg.seed), batch.drawn)
        part = runner.run(
            "moves",
            (calls[0],),
            moves_task,
            Rows(subsample, stratum),
            params=params,
            pids=None if batch is None else batch.units,
        )
        return part.payload

    if not full_batch:
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

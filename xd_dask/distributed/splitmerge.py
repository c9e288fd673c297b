"""Split-and-merge on the cluster: the criteria pass (``xd-moves`` tasks + tree reduction).

One pass over the catalogue at the converged parameters returns the sums of
:class:`xd_dask.optim.splitmerge.MoveStats` (K x K + 3 K numbers, whatever the number of rows),
from which the client ranks the candidate moves; the moves themselves (partial EM, full EM)
are ordinary ``xd-estep`` passes of the one fitting loop. Public: :func:`moves_task`,
:func:`pass_moves`.
"""

from __future__ import annotations

import time
from typing import Any

from xd_dask.distributed.tasks import Block, Params, Partial, TaskOptions, read_block
from xd_dask.optim.loop import Mixture
from xd_dask.optim.splitmerge import MoveStats, SplitMerge, move_stats

__all__ = ["moves_task", "pass_moves"]


def moves_task(source: Any, params: Params, opts: TaskOptions, background: Any = None) -> Partial:
    """The split-and-merge criteria's sums over one partition (``xd-moves``); the block's
    projections ``R`` are used when it has them."""
    t0 = time.perf_counter()
    if opts.gpu:
        raise ValueError("split-and-merge runs on CPU workers only (cluster.gpu = false)")
    blk = source if isinstance(source, Block) else read_block(source, opts)
    p = Mixture(params.weights, params.means, params.covariances, background)
    ms = move_stats(
        blk.X, blk.X_cov, p, R=getattr(blk, "R", None), backend=opts.backend, check=False
    )
    return Partial(ms, 1, blk.n_read, blk.n_rows, dict(blk.dropped), time.perf_counter() - t0)


def pass_moves(runner: Any, cfg: Any) -> SplitMerge:
    """The split-and-merge controller of a fit (``cfg``: FitConfig) whose criteria run as one
    ``xd-moves`` pass of ``runner`` (:class:`xd_dask.distributed.passes.PassRunner`)."""
    if cfg.method != "em":
        raise ValueError(
            f"fit.split_merge needs fit.method = 'em' (got {cfg.method!r}): the stochastic "
            "variant for online EM / Adam on waves is not implemented"
        )
    calls = [0]

    def criteria(params: Mixture) -> MoveStats:
        calls[0] += 1
        part = runner.run(
            "moves",
            (calls[0],),
            moves_task,
            shared=(Params(params.weights, params.means, params.covariances),),
            extra=(runner.opts, params.background),
        )
        return part.payload

    return SplitMerge(
        criteria,
        candidates=int(cfg.split_merge_candidates),
        partial_iter=int(cfg.split_merge_partial_iter),
        max_moves=int(cfg.split_merge_max_moves),
        tol=float(cfg.tol),
    )

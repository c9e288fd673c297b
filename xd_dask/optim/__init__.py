"""Fitting: one loop (:mod:`.loop`) for every update rule (:mod:`.batch`, :mod:`.online`,
:mod:`.adam`) and every source of statistics (arrays in memory, :mod:`.arrays`; a catalogue on a
Dask cluster, :mod:`xd_dask.distributed.fit`), in full batches, waves of units or hash strata of
the rows (:mod:`.strata`), with the robust checks of :mod:`.robust` and the background
component's box of :mod:`.background`; full-batch EM may add split-and-merge moves
(:mod:`.splitmerge`).

Layering: optim sits beside :mod:`xd_dask.em` (it imports kernels and em, nothing above).
"""

from xd_dask.optim.adam import Adam
from xd_dask.optim.arrays import ArrayStatistics
from xd_dask.optim.background import bounding_box, initial_background
from xd_dask.optim.batch import BatchEM
from xd_dask.optim.loop import (
    Batch,
    BatchStats,
    ConvergenceWarning,
    FitLoop,
    LoopSettings,
    LoopState,
    Mixture,
    StatisticsSource,
    Update,
    UpdateRule,
    epoch_order,
)
from xd_dask.optim.online import OnlineEM
from xd_dask.optim.robust import MAX_LL_DROP, FitDivergedError
from xd_dask.optim.splitmerge import MoveStats, SplitMerge

__all__ = [
    "MAX_LL_DROP",
    "Adam",
    "ArrayStatistics",
    "Batch",
    "BatchEM",
    "BatchStats",
    "ConvergenceWarning",
    "FitDivergedError",
    "FitLoop",
    "LoopSettings",
    "LoopState",
    "Mixture",
    "MoveStats",
    "OnlineEM",
    "SplitMerge",
    "StatisticsSource",
    "Update",
    "UpdateRule",
    "bounding_box",
    "epoch_order",
    "initial_background",
]

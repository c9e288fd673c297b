"""Fitting: one loop (:mod:`.loop`) for every method of the method table (:mod:`.methods`: batch
EM :mod:`.batch`, online EM :mod:`.online`, Adam :mod:`.adam`) and every source of statistics
(arrays in memory, :mod:`.arrays`; a catalogue on a Dask cluster, :mod:`xd_dask.distributed.fit`),
in full batches, waves of units or hash strata of the rows (:mod:`.strata`), with the robust
checks of :mod:`.robust`, regularisation and collapsed components (:mod:`.collapse`), the
background component's box (:mod:`.background`), the starts (:mod:`.init`, :mod:`.kmeans`) and
split-and-merge moves (:mod:`.splitmerge`).

Layering: optim imports the parameters, the kernels and the configuration table, nothing above.
"""

from xd_dask.optim.adam import Adam
from xd_dask.optim.arrays import ArrayStatistics
from xd_dask.optim.background import bounding_box, initial_background
from xd_dask.optim.batch import BatchEM, batch_update
from xd_dask.optim.loop import ConvergenceWarning, FitLoop
from xd_dask.optim.methods import Method, Settings, method, method_names, register
from xd_dask.optim.online import OnlineEM, online_update
from xd_dask.optim.robust import FitDivergedError
from xd_dask.optim.rules import Action, BatchMoves, StepData, Update, UpdateRule, WaveMoves
from xd_dask.optim.schedule import StepSchedule
from xd_dask.optim.splitmerge import MoveStats, SplitMerge, WaveSplitMerge
from xd_dask.optim.steps import (
    Batch,
    BatchStats,
    LoopSettings,
    LoopState,
    StatisticsSource,
    epoch_order,
)

__all__ = [
    "Action",
    "Adam",
    "ArrayStatistics",
    "Batch",
    "BatchEM",
    "BatchMoves",
    "BatchStats",
    "ConvergenceWarning",
    "FitDivergedError",
    "FitLoop",
    "LoopSettings",
    "LoopState",
    "Method",
    "MoveStats",
    "OnlineEM",
    "Settings",
    "SplitMerge",
    "StatisticsSource",
    "StepData",
    "StepSchedule",
    "Update",
    "UpdateRule",
    "WaveMoves",
    "WaveSplitMerge",
    "batch_update",
    "bounding_box",
    "epoch_order",
    "initial_background",
    "method",
    "method_names",
    "online_update",
    "register",
]

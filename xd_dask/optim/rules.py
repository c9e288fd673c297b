"""The fitting loop's contracts: what an update rule is (batch EM, online EM, Adam or any rule a
method table entry of :mod:`xd_dask.optim.methods` names), and what move controllers
(split-and-merge) are.

A rule gets, per step, :class:`StepData`: the statistics of the step's rows at the current
parameters, and two ways to look again -- the same rows at other parameters (``at``) and every
row at given parameters (``full``), each one more pass -- so a variance-reduced or
natural-gradient rule fits without editing the loop. It returns its new state (a dict of arrays,
which the checkpoint saves) and an :class:`Update`.

Moves are objects of :class:`BatchMoves` (between full-batch EM runs) or :class:`WaveMoves` (on
waves); they answer each step with an :class:`Action` and keep their own state as JSON in
``LoopState.info``, so checkpoints carry it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np

from xd_dask.kernels import SuffStats
from xd_dask.params import Params

__all__ = ["Action", "BatchMoves", "StepData", "Update", "UpdateRule", "WaveMoves"]


@dataclass
class Update:
    """A rule's proposal: new parameters, the components it re-seeded, the step size used."""

    params: Params
    reseeded: list[int] = field(default_factory=list)
    step: float = 1.0


@dataclass
class StepData:
    """What a rule sees in one step.

    stats : statistics of the step's rows (a wave, or every row) at the current parameters.
    batch : the step (:class:`xd_dask.optim.loop.Batch`): iteration, epoch, wave, rows.
    at : ``at(params) -> SuffStats`` of the same rows at other parameters (one more pass).
    full : ``full(params) -> SuffStats`` of every row at given parameters (a full pass).
    epoch_means : the mean log-likelihoods of the epochs completed so far (waves; every row
        once, at its wave's parameters): what a rule that adapts its step to progress reads.
    """

    stats: SuffStats
    batch: Any
    at: Callable[[Params], SuffStats]
    full: Callable[[Params], SuffStats]
    epoch_means: tuple[float, ...] = ()


class UpdateRule(Protocol):
    """``name`` (stored in checkpoints); ``monotone``: a full-batch step never lowers the
    log-likelihood (switches the loop's drop check on).

    Optional members the loop asks for when present: ``fixed_waves`` (the rule needs the same
    waves every epoch, incremental EM) and ``settled(state) -> bool`` (whether the tolerance may
    stop a fit on waves yet; Adam: only after its rate decayed)."""

    name: str
    monotone: bool

    def init(self, params: Params) -> dict[str, np.ndarray]: ...

    def step(
        self, state: dict[str, np.ndarray], data: StepData, params: Params, t: int
    ) -> tuple[dict[str, np.ndarray], Update]: ...

    def step_size(self, t: int) -> float: ...


class Action(str, Enum):
    """What a move controller tells the loop to do this step (the value goes into the history).

    UPDATE: an ordinary update.  PARTIAL: a partial update (only the components
    :meth:`BatchMoves.partial` names).  MOVED: the controller replaced the parameters; no update
    this step (on waves the rule's state is re-initialised).  RESTORED: the controller put back
    the parameters and the rule's state (waves).  DONE: the fit is finished.
    """

    UPDATE = "update"
    PARTIAL = "partial"
    MOVED = "moved"
    RESTORED = "restored"
    DONE = "done"


class BatchMoves(ABC):
    """Moves between full-batch EM runs (split-and-merge, :class:`xd_dask.optim.splitmerge.
    SplitMerge`): sees each step's mean log-likelihood and whether the EM run settled."""

    @abstractmethod
    def advance(self, state: Any, ll: float, settled: bool, max_steps: int) -> Action: ...

    @abstractmethod
    def partial(self, state: Any) -> tuple[int, ...] | None:
        """The components a PARTIAL step updates (None: all)."""

    @abstractmethod
    def restrict(self, upd: Update, before: Params, components: tuple[int, ...]) -> Update:
        """``upd`` with only ``components`` changed from ``before``."""

    @abstractmethod
    def max_total(self, max_steps: int) -> int:
        """A bound on the loop's steps when every EM run has at most ``max_steps``."""


class WaveMoves(ABC):
    """Moves on waves (stochastic split-and-merge, :class:`xd_dask.optim.splitmerge.
    WaveSplitMerge`): ``stats_at(params)`` gives the wave's statistics at other parameters."""

    @abstractmethod
    def advance_wave(
        self, state: Any, ll: float, batch: Any, stats_at: Callable[[Params], SuffStats]
    ) -> Action: ...

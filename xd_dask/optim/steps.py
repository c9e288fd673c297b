"""The fitting loop's bookkeeping: which rows a step sees (:class:`Batch`), what a statistics
source returns (:class:`BatchStats`), the schedule (:class:`LoopSettings`, defaults from the key
table) and everything a checkpoint must hold to continue exactly (:class:`LoopState`).

Statistics source (:class:`StatisticsSource`): ``source(params, batch) -> BatchStats`` returns
the sufficient statistics of the rows of ``batch`` at ``params``; ``source.n_units`` is the number
of units the data come in (partitions; 1 for arrays in memory) and ``source.worst_rows(before,
after, m)`` names the ``m`` rows whose log-likelihood fell most between two parameter sets, or
with ``after=None`` the ``m`` least likely rows at ``before`` (dicts: row, ll_before, ll_after,
component, and file / id where known; used only when a fit diverges), and
``source.rows_of(params, j, m)`` the ``m`` rows most responsible to component j.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from xd_dask.config import key
from xd_dask.kernels import SuffStats
from xd_dask.params import Params

__all__ = [
    "Batch",
    "BatchStats",
    "LoopSettings",
    "LoopState",
    "StatisticsSource",
    "add_counts",
    "epoch_order",
]


@dataclass(frozen=True)
class Batch:
    """The rows of one step: ``units`` (partition ids; None = every unit), its 1-based
    ``iteration`` (step counter t + 1), ``epoch`` and ``wave`` (1-based), and ``stratum``
    ``(s, S)``: only the rows of hash stratum s of S of each unit (None: all their rows; the
    source decides which rows form a stratum, from the loop's seed and ``draw``). ``extra`` > 0
    numbers a further pass over the same rows within the step (a rule or a move scoring other
    parameters on them): it only changes the label. ``draw`` is the epoch (0-based) whose strata
    and subsamples the rows are drawn from: the current one, or always 0 for a rule that needs
    the same waves every epoch (``fixed_waves``); ``slot`` (of ``n_slots``) then says which of
    those fixed waves this is."""

    iteration: int
    epoch: int
    wave: int
    units: list[int] | None = None
    stratum: tuple[int, int] | None = None
    extra: int = 0
    draw: int | None = None
    slot: int | None = None
    n_slots: int = 0

    @property
    def drawn(self) -> int:
        """The epoch the rows are drawn from (``draw``, else the current one)."""
        return self.epoch - 1 if self.draw is None else self.draw

    @property
    def full(self) -> bool:
        """Every row of every unit."""
        return self.units is None and self.stratum is None

    @property
    def label(self) -> tuple[int | str, ...]:
        """A key for task names and spans: (iteration,) for full batches, else (epoch, wave);
        a further pass adds ``"x<extra>"``."""
        label = (self.iteration,) if self.full else (self.epoch, self.wave)
        return label if not self.extra else (*label, f"x{self.extra}")


@dataclass
class BatchStats:
    """What a statistics source returns for a batch.

    stats : statistics of the batch's rows at the given parameters.
    counts : ``{"read": int, "used": int, "dropped": {reason: int}}`` rows of the batch.
    info : extra JSON-serialisable entries for the history (e.g. ``task_seconds``).
    """

    stats: SuffStats
    counts: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


class StatisticsSource(Protocol):
    n_units: int

    def __call__(self, params: Params, batch: Batch) -> BatchStats: ...

    def worst_rows(self, before: Params, after: Params | None, m: int) -> list[dict]: ...

    def rows_of(self, params: Params, component: int, m: int) -> list[dict]: ...


def _default(name: str) -> Any:
    return key(name).default


@dataclass(frozen=True)
class LoopSettings:
    """How long and in what order a fit runs (defaults: the key table's).

    max_steps : full batch: at most this many iterations (``fit.max_iter``).
    epochs : waves: at most this many epochs, passes over the units (``fit.epochs``).
    wave_size : units per step (None: full batch).  seed : the epochs' orders derive from it.
    strata : waves are hash strata instead (None: waves of units): each epoch has ``strata``
        waves, wave w takes stratum ``order[w]`` of the rows of every unit (``wave_size`` is
        then ignored).
    tol : full batch: converged when the mean log-likelihood changes by less between two
        iterations; waves: when the EPOCH mean log-likelihood (every row once, at the
        parameters of its wave) changes by less between two epochs (0: never).
    max_ll_drop : robust rule (:mod:`xd_dask.optim.robust`), nats per row.
    worst_rows : rows named when a fit diverges.
    """

    max_steps: int = _default("fit.max_iter")
    epochs: int = _default("fit.epochs")
    wave_size: int | None = None
    strata: int | None = None
    seed: int = _default("fit.seed")
    tol: float = _default("fit.tol")
    max_ll_drop: float = _default("fit.max_ll_drop")
    worst_rows: int = 5

    @property
    def full_batch(self) -> bool:
        return self.wave_size is None and self.strata is None


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """Seeded unit order of an epoch (depends on seed and epoch only)."""
    return [int(i) for i in np.random.default_rng([int(seed), 3, int(epoch)]).permutation(n)]


@dataclass
class LoopState:
    """Everything a fit needs to continue exactly (what a checkpoint holds).

    params : current parameters (every accepted update has passed the robust checks).
    rule, rule_state : the update rule's name and its state arrays.
    previous, previous_rule_state : the parameters (and rule state) before the last update,
        the roll-back target of the drop check (None when unknown).
    iteration : steps done.  epoch, wave : waves: the next wave is ``wave`` of ``epoch``
        (0-based); ``order`` the current epoch's unit order.
    counts : rows read / used / dropped per reason in the last complete pass over the data;
        ``epoch_counts`` the same for the current, incomplete epoch, and ``epoch_sums`` its
        summed log-likelihood and row weight ``{"ll", "W"}`` (waves).
    history : one entry per step.  reseeded : ``{"iteration", "components"}`` records.
    info : the caller's bookkeeping (JSON), e.g. how the fit was initialised.
    """

    params: Params
    rule: str
    rule_state: dict[str, np.ndarray] = field(default_factory=dict)
    previous: Params | None = None
    previous_rule_state: dict[str, np.ndarray] | None = None
    iteration: int = 0
    epoch: int = 0
    wave: int = 0
    order: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    epoch_counts: dict = field(default_factory=dict)
    epoch_sums: dict = field(default_factory=dict)
    reseeded: list[dict] = field(default_factory=list)
    converged: bool = False
    finished: bool = False
    info: dict = field(default_factory=dict)


def add_counts(acc: dict, counts: dict) -> dict:
    """Sum two ``{"read", "used", "dropped": {reason: n}}`` records."""
    dropped = dict(acc.get("dropped", {}))
    for k, v in counts.get("dropped", {}).items():
        dropped[k] = dropped.get(k, 0) + int(v)
    return {
        "read": int(acc.get("read", 0)) + int(counts.get("read", 0)),
        "used": int(acc.get("used", 0)) + int(counts.get("used", 0)),
        "dropped": dropped,
    }

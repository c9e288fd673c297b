"""The one fitting loop: tolerance, history, re-seeding records, warnings, robust checks and
checkpoints, for any update rule and any source of statistics.

Three small contracts meet here.

Statistics source (:class:`StatisticsSource`): ``source(params, batch) -> BatchStats`` returns
the sufficient statistics (:class:`xd_dask.kernels.SuffStats`) of the rows of ``batch`` at
``params``; ``source.n_units`` is the number of units the data come in (partitions; 1 for arrays
in memory) and ``source.worst_rows(before, after, m)`` names the ``m`` rows whose log-likelihood
fell most between two parameter sets, or with ``after=None`` the ``m`` least likely rows at
``before`` (dicts: row, ll_before, ll_after, component, and file / source_id where known; used
only when a fit diverges).
:class:`xd_dask.optim.arrays.ArrayStatistics` serves arrays in memory; the distributed fit serves
a catalogue through its pass runner.

Update rule (:class:`UpdateRule`): ``init(params) -> state``, ``step(state, stats, params, t) ->
(state, Update)``; the state is a dict of arrays, so a checkpoint saves whatever a rule declares
(``state_arrays`` is the state itself). ``monotone`` says whether a full-batch step may never lower
the log-likelihood (batch EM: yes; online EM, Adam: no), which switches the drop check on.

Schedule (:class:`LoopSettings`): ``wave_size=None`` and ``strata=None`` is full batch (every unit
in every step; one step per "iteration", at most ``max_steps``; converged when the mean
log-likelihood changes by less than ``tol``); otherwise each epoch visits the units in a seeded
order (:func:`epoch_order`), ``wave_size`` units per step, or, with ``strata=S``, S hash strata of
the rows of every unit in a seeded order, one per step, for ``epochs`` epochs.

Per step the loop: asks the source for statistics at the current parameters; for full-batch
monotone rules checks the change of the mean log-likelihood (:mod:`xd_dask.optim.robust`; a
catastrophic drop rolls back to the previous parameters, writes that checkpoint, names the rows and
components and raises :class:`~xd_dask.optim.robust.FitDivergedError`); tests convergence; asks the
rule for the update; checks it (finite, positive definite, weights) BEFORE accepting it; records
history and re-seeding; checkpoints; logs; calls ``progress``.

Moves (optional): full batch with a monotone rule, an object like
:class:`xd_dask.optim.splitmerge.SplitMerge` sees each step's mean log-likelihood through
``moves.advance(state, ll, settled, max_steps) -> "update" | "partial" | "moved" | "done"``; it
may replace ``state.params`` ("moved": no update this step, and the next step is not compared
with this one), ask for a partial update (``moves.partial(state)`` names the components,
``moves.restrict(update, params, components)`` keeps the others), or end the fit ("done").
On waves, an object like :class:`xd_dask.optim.splitmerge.WaveSplitMerge` is asked
``moves.advance_wave(state, ll, batch, stats_at) -> "update" | "moved" | "restored"``
(``stats_at(p)``: the wave's statistics at other parameters, one more pass over the same rows);
"moved"
re-initialises the rule's state at the new parameters, "restored" means the moves put back both.
Their state is JSON in ``state.info``, so checkpoints carry it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from xd_dask.kernels import Background, SuffStats
from xd_dask.optim import robust
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = [
    "Batch",
    "BatchStats",
    "ConvergenceWarning",
    "FitLoop",
    "LoopSettings",
    "LoopState",
    "Mixture",
    "StatisticsSource",
    "Update",
    "UpdateRule",
    "epoch_order",
]


class ConvergenceWarning(UserWarning):
    """Full-batch fitting stopped at its iteration limit before the mean log-likelihood settled
    within ``tol`` (never raised with ``tol = 0``, which asks for exactly that many iterations)."""


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Mixture:
    """Mixture parameters: Gaussian ``weights`` (K,), ``means`` (K, D), ``covariances``
    (K, D, D), and an optional uniform ``background`` (the Gaussian weights then sum to
    1 - background.weight)."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    background: Background | None = None

    @property
    def background_weight(self) -> float:
        return 0.0 if self.background is None else float(self.background.weight)

    def with_background_weight(self, weight: float) -> Background | None:
        """This mixture's background box with a new weight (None without a background)."""
        if self.background is None:
            return None
        return Background(weight, self.background.lo, self.background.hi)

    def updated(self, upd: Any) -> Mixture:
        """The mixture an EM update (:class:`xd_dask.em.EMUpdate`) gives; the background keeps
        its box and takes the update's weight."""
        bg = self.with_background_weight(upd.background_weight)
        return Mixture(upd.weights, upd.means, upd.covariances, bg)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"weights": self.weights, "means": self.means, "covariances": self.covariances}
        if self.background is not None:
            out |= {
                "background_weight": np.array(self.background.weight),
                "background_lo": np.asarray(self.background.lo),
                "background_hi": np.asarray(self.background.hi),
            }
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Mixture:
        bg = None
        if "background_weight" in arrays:
            bg = Background(
                float(arrays["background_weight"]),
                arrays["background_lo"],
                arrays["background_hi"],
            )
        return cls(
            np.array(arrays["weights"]),
            np.array(arrays["means"]),
            np.array(arrays["covariances"]),
            bg,
        )


# ----------------------------------------------------------------------------- contracts
@dataclass(frozen=True)
class Batch:
    """The rows of one step: ``units`` (partition ids; None = every unit), its 1-based
    ``iteration`` (step counter t + 1), ``epoch`` and ``wave`` (1-based), and ``stratum``
    ``(s, S)``: only the rows of hash stratum s of S of each unit (None: all their rows; the
    source decides which rows form a stratum, from the loop's seed and the epoch). ``extra`` > 0
    numbers a further pass over the same rows within the step (split-and-merge moves on waves
    score other parameters on them): it only changes the label."""

    iteration: int
    epoch: int
    wave: int
    units: list[int] | None = None
    stratum: tuple[int, int] | None = None
    extra: int = 0

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

    def __call__(self, params: Mixture, batch: Batch) -> BatchStats: ...

    def worst_rows(self, before: Mixture, after: Mixture | None, m: int) -> list[dict]: ...


@dataclass
class Update:
    """A rule's proposal: new parameters, the components it re-seeded, the step size used."""

    params: Mixture
    reseeded: list[int] = field(default_factory=list)
    step: float = 1.0


class UpdateRule(Protocol):
    name: str
    monotone: bool

    def init(self, params: Mixture) -> dict[str, np.ndarray]: ...

    def step(
        self, state: dict[str, np.ndarray], stats: SuffStats, params: Mixture, t: int
    ) -> tuple[dict[str, np.ndarray], Update]: ...

    def step_size(self, t: int) -> float: ...


@dataclass(frozen=True)
class LoopSettings:
    """How long and in what order a fit runs (module docstring).

    max_steps : full batch: at most this many iterations.  epochs : waves: passes over the units.
    wave_size : units per step (None: full batch).  seed : the epochs' unit orders derive from it.
    strata : waves are hash strata instead (None: waves of units): each epoch has ``strata``
        waves, wave w takes stratum ``order[w]`` of the rows of every unit (``wave_size`` is
        then ignored).
    tol : full batch: converged when the mean log-likelihood changes by less (0: never).
    max_ll_drop : robust rule (:mod:`xd_dask.optim.robust`), nats per row.
    worst_rows : rows named when a fit diverges.
    """

    max_steps: int = 100
    epochs: int = 1
    wave_size: int | None = None
    strata: int | None = None
    seed: int = 0
    tol: float = 1e-6
    max_ll_drop: float = robust.MAX_LL_DROP
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
        ``epoch_counts`` the same for the current, incomplete epoch.
    history : one entry per step.  reseeded : ``{"iteration", "components"}`` records.
    info : the caller's bookkeeping (JSON), e.g. how the fit was initialised.
    """

    params: Mixture
    rule: str
    rule_state: dict[str, np.ndarray] = field(default_factory=dict)
    previous: Mixture | None = None
    previous_rule_state: dict[str, np.ndarray] | None = None
    iteration: int = 0
    epoch: int = 0
    wave: int = 0
    order: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    epoch_counts: dict = field(default_factory=dict)
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


# ----------------------------------------------------------------------------- the loop
class FitLoop:
    """Runs an update rule on a statistics source (module docstring).

    Parameters
    ----------
    rule : the update rule.  source : the statistics source.  settings : the schedule.
    checkpoint : called with the state after every step (and at the end, and after a roll-back).
    progress : called with each history entry plus ``total`` (planned steps).
    log_level : level of the per-step log line.
    """

    def __init__(
        self,
        rule: UpdateRule,
        source: StatisticsSource,
        settings: LoopSettings,
        *,
        checkpoint: Callable[[LoopState], None] | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        log_level: int = logging.INFO,
        moves: Any = None,
    ) -> None:
        if moves is not None and settings.full_batch != rule.monotone:
            raise ValueError(
                "split-and-merge moves need batch EM in full batches, or online EM / Adam on waves"
            )
        if moves is not None and not hasattr(moves, "advance" if rule.monotone else "advance_wave"):
            raise ValueError(f"{type(moves).__name__} moves do not fit update rule {rule.name!r}")
        if settings.wave_size is not None and int(settings.wave_size) < 1:
            raise ValueError("wave_size must be >= 1 (or None for full batches)")
        if settings.strata is not None and int(settings.strata) < 1:
            raise ValueError("strata must be >= 1 (or None for waves of units)")
        self.rule = rule
        self.source = source
        self.settings = settings
        self.checkpoint = checkpoint
        self.progress = progress
        self.log_level = log_level
        self.moves = moves

    # ------------------------------------------------------------------ state
    def start(self, params: Mixture, info: dict | None = None) -> LoopState:
        """The state before the first step (checked like every update)."""
        robust.check_params(params, "the initial parameters")
        state = LoopState(params=params, rule=self.rule.name, rule_state=self.rule.init(params))
        state.info = dict(info or {})
        if not self.settings.full_batch:
            state.order = epoch_order(self.settings.seed, 0, self._n_orderable)
        self._checkpoint(state)
        return state

    @property
    def _n_orderable(self) -> int:
        """What an epoch's order permutes: the strata, or the units."""
        s = self.settings
        return int(s.strata) if s.strata is not None else self.source.n_units

    def _checkpoint(self, state: LoopState) -> None:
        if self.checkpoint is not None:
            self.checkpoint(state)

    @property
    def n_waves(self) -> int:
        if self.settings.full_batch:
            return 1
        if self.settings.strata is not None:
            return int(self.settings.strata)
        P = min(int(self.settings.wave_size), self.source.n_units)
        return -(-self.source.n_units // P)

    @property
    def total(self) -> int:
        """Planned steps."""
        s = self.settings
        return int(s.max_steps) if s.full_batch else int(s.epochs) * self.n_waves

    @property
    def _max_steps(self) -> int:
        s = self.settings
        return int(s.max_steps) if self.moves is None else self.moves.max_total(s.max_steps)

    def _done(self, state: LoopState) -> bool:
        s = self.settings
        if s.full_batch:
            return state.converged or state.iteration >= self._max_steps
        return state.epoch >= s.epochs

    def _batch(self, state: LoopState) -> Batch:
        if self.settings.full_batch:
            return Batch(state.iteration + 1, state.iteration + 1, 1, None)
        if not state.order:
            state.order = epoch_order(self.settings.seed, state.epoch, self._n_orderable)
        if self.settings.strata is not None:
            stratum = (int(state.order[state.wave]), int(self.settings.strata))
            return Batch(state.iteration + 1, state.epoch + 1, state.wave + 1, None, stratum)
        P = min(int(self.settings.wave_size), self.source.n_units)
        units = state.order[state.wave * P : (state.wave + 1) * P]
        return Batch(state.iteration + 1, state.epoch + 1, state.wave + 1, [int(u) for u in units])

    # ------------------------------------------------------------------ steps
    def run(self, state: LoopState) -> LoopState:
        """Run to the end of the schedule; returns the finished state."""
        if state.rule != self.rule.name:
            raise ValueError(
                f"the state belongs to update rule {state.rule!r}, not {self.rule.name!r}"
            )
        if state.finished:
            return state
        while not self._done(state):
            self.step(state)
        s = self.settings
        if s.full_batch and not state.converged and s.tol > 0:
            warnings.warn(
                f"{self.rule.name} did not converge in {s.max_steps} iterations (tol={s.tol}); "
                "raise max_iter or tol",
                ConvergenceWarning,
                stacklevel=3,
            )
        state.finished = True
        self._checkpoint(state)
        return state

    def step(self, state: LoopState) -> None:
        """One step: statistics, checks, update, record."""
        s = self.settings
        t0 = time.perf_counter()
        batch = self._batch(state)
        res = self.source(state.params, batch)
        stats = res.stats
        if s.full_batch and stats.W <= 0:
            raise ValueError("no valid rows (total weight 0: every row was dropped)")
        ll = stats.ll / stats.W if stats.W > 0 else float("nan")
        if stats.W > 0 and not math.isfinite(ll):
            rows = self.source.worst_rows(state.params, None, s.worst_rows)
            raise robust.nonfinite_error(self.rule.name, batch.iteration, ll, rows)
        moved = bool(state.history and state.history[-1].get("moved"))
        prev = state.history[-1]["mean_loglike"] if state.history and not moved else None
        if s.full_batch and self.rule.monotone and prev is not None:
            if robust.is_catastrophic(prev, ll, s.max_ll_drop):
                self._diverged(state, batch, prev, ll)
            robust.note_decrease(prev, ll, state.history[-1].get("reseeded", []), batch.iteration)
        state.converged = s.full_batch and prev is not None and abs(ll - prev) < s.tol
        action, partial = "update", None
        if self.moves is not None:
            before, before_rule = state.params, state.rule_state
            if s.full_batch:
                action = self.moves.advance(state, ll, state.converged, s.max_steps)
                partial = self.moves.partial(state) if action == "partial" else None
            else:
                action = self.moves.advance_wave(state, ll, batch, self._stats_at(batch))
            state.converged = action == "done"
            if action == "moved":  # new parameters: no update from statistics at the old ones
                state.previous, state.previous_rule_state = before, before_rule
                state.rule_state = self.rule.init(state.params)
        t = state.iteration
        state.iteration += 1
        entry: dict[str, Any] = {
            "iteration": batch.iteration,
            "epoch": batch.epoch,
            "wave": batch.wave,
            "mean_loglike": ll,
            "step": self.rule.step_size(t),
            "rows": int(res.counts.get("used", stats.n_rows)),
        }
        if batch.units is not None:
            entry["partitions"] = list(batch.units)
        if batch.stratum is not None:
            entry["stratum"] = list(batch.stratum)
        entry |= res.info
        entry["reseeded"] = []
        if self.moves is not None:
            entry["split_merge"] = action
            entry["moved"] = action in ("moved", "restored")
        if action not in ("moved", "restored") and not state.converged and stats.W > 0:
            rule_state, upd = self._update(state, stats, t, batch, partial)
            state.previous, state.previous_rule_state = state.params, state.rule_state
            state.params, state.rule_state = upd.params, rule_state
            entry["step"] = upd.step
            entry["reseeded"] = list(upd.reseeded)
            if upd.reseeded:
                state.reseeded.append(
                    {"iteration": batch.iteration, "components": list(upd.reseeded)}
                )
        if s.full_batch:
            state.counts = add_counts({}, res.counts)
        else:
            state.epoch_counts = add_counts(state.epoch_counts, res.counts)
            state.wave += 1
            if state.wave == self.n_waves:  # epoch complete: next epoch, new seeded order
                state.counts, state.epoch_counts = state.epoch_counts, {}
                state.epoch, state.wave, state.order = state.epoch + 1, 0, []
        entry["seconds"] = time.perf_counter() - t0
        state.history.append(entry)
        self._checkpoint(state)
        self._log(entry, prev)
        if self.progress is not None:
            self.progress(dict(entry, total=self.total))

    def _stats_at(self, batch: Batch) -> Callable[[Mixture], SuffStats]:
        """``stats_at(params)``: statistics of ``batch``'s rows at other parameters, each call
        a pass of its own (a distinct label, so a cluster never reuses an earlier result)."""
        calls = [0]

        def stats_at(params: Mixture) -> SuffStats:
            calls[0] += 1
            return self.source(params, dataclasses.replace(batch, extra=calls[0])).stats

        return stats_at

    def _update(
        self,
        state: LoopState,
        stats: SuffStats,
        t: int,
        batch: Batch,
        partial: tuple[int, ...] | None = None,
    ) -> tuple[dict[str, np.ndarray], Update]:
        """The rule's update (only components ``partial`` when given), checked; a failure names
        the least likely rows."""
        try:
            rule_state, upd = self.rule.step(state.rule_state, stats, state.params, t)
            if partial is not None:
                upd = self.moves.restrict(upd, state.params, partial)
            robust.check_params(upd.params, "the new parameters")
        except FloatingPointError as exc:  # FitDivergedError included
            rows = self.source.worst_rows(state.params, None, self.settings.worst_rows)
            raise robust.update_failed_error(self.rule.name, batch.iteration, exc, rows) from None
        return rule_state, upd

    def _log(self, entry: dict, prev: float | None) -> None:
        where = (
            f"iteration {entry['iteration']}"
            if self.settings.full_batch
            else f"epoch {entry['epoch']} wave {entry['wave']} (t={entry['iteration']})"
        )
        log.log(
            self.log_level,
            "%s: mean log-likelihood %.10g (change %.3g), step %.4g, rows %d, %.3f s",
            where,
            entry["mean_loglike"],
            entry["mean_loglike"] - (float("nan") if prev is None else prev),
            entry["step"],
            entry["rows"],
            entry["seconds"],
        )

    def _diverged(self, state: LoopState, batch: Batch, prev: float, ll: float) -> None:
        """Roll back the last update, checkpoint the rolled-back state, raise naming rows."""
        bad, before = state.params, state.previous
        last = state.history[-1]
        if before is None:  # resumed right after the update: nothing to roll back to
            raise robust.diverged_error(
                self.rule.name, last, prev, ll, self.settings.max_ll_drop, [], rolled_back=False
            )
        rows = self.source.worst_rows(before, bad, self.settings.worst_rows)
        state.params, state.rule_state = before, state.previous_rule_state or {}
        state.previous, state.previous_rule_state = None, None
        state.iteration -= 1
        state.history.pop()
        state.reseeded = [r for r in state.reseeded if r["iteration"] != last["iteration"]]
        state.converged = False
        self._checkpoint(state)
        raise robust.diverged_error(
            self.rule.name, last, prev, ll, self.settings.max_ll_drop, rows, rolled_back=True
        )

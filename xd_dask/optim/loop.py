"""The one fitting loop: tolerance, history, re-seeding records, warnings, robust checks and
checkpoints, for any update rule and any source of statistics.

Three contracts meet here: the statistics source and the schedule (:mod:`.steps`), and the update
rule and the move controllers (:mod:`.rules`).

Schedule: ``wave_size=None`` and ``strata=None`` is full batch (every unit in every step; one
step per "iteration", at most ``max_steps``; converged when the mean log-likelihood changes by
less than ``tol``); otherwise each epoch visits the units in a seeded order (:func:`epoch_order`),
``wave_size`` units per step, or, with ``strata=S``, S hash strata of the rows of every unit in
a seeded order, one per step, for at most ``epochs`` epochs.

Stopping on waves (DESIGN.md 4b): a wave's mean log-likelihood is over different rows each time
and says little about convergence. An epoch visits every row once, so the epoch's summed wave
log-likelihoods over its summed row weight (``epoch_mean_loglike``, each row scored at the
parameters of its wave) estimates the mean log-likelihood of all rows; a fit on waves is
converged when it changes by less than ``tol`` between two epochs. A fit that stops at its
epoch limit first warns (:class:`ConvergenceWarning`) with the remaining change. At the end one
full pass scores the FINAL parameters on every row: the last history entry (``"final": true``)
holds that ``mean_loglike``; wave entries hold their own figure as ``wave_mean_loglike``.

Per step the loop: asks the source for statistics at the current parameters; for full-batch
monotone rules checks the change of the mean log-likelihood (:mod:`xd_dask.optim.robust`; a
catastrophic drop rolls back to the previous parameters, writes that checkpoint, names the rows and
components and raises :class:`~xd_dask.optim.robust.FitDivergedError`); tests convergence; asks the
rule for the update (:class:`~xd_dask.optim.rules.StepData`: the step's statistics, and passes at
other parameters on the same rows or on every row when the rule asks); checks it (finite,
positive definite, weights) BEFORE accepting it; records history and re-seeding; checkpoints;
logs; calls ``progress``.

Moves (optional): a :class:`~xd_dask.optim.rules.BatchMoves` (full batch, monotone rule) sees each
step's mean log-likelihood and answers with an :class:`~xd_dask.optim.rules.Action`: it may
replace ``state.params`` (MOVED: no update this step, and the next step is not compared with this
one), ask for a PARTIAL update (``moves.partial(state)`` names the components,
``moves.restrict(update, params, components)`` keeps the others), or end the fit (DONE). A
:class:`~xd_dask.optim.rules.WaveMoves` on waves answers MOVED (the rule's state is
re-initialised at the new parameters) or RESTORED (the moves put back both). Their state is JSON
in ``state.info``, so checkpoints carry it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from xd_dask.kernels import SuffStats
from xd_dask.optim import robust
from xd_dask.optim.rules import Action, BatchMoves, StepData, Update, UpdateRule, WaveMoves
from xd_dask.optim.steps import (
    Batch,
    LoopSettings,
    LoopState,
    StatisticsSource,
    add_counts,
    epoch_order,
)
from xd_dask.params import Params
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["ConvergenceWarning", "FitLoop"]


class ConvergenceWarning(UserWarning):
    """A fit stopped at its iteration or epoch limit before it settled within its tolerance
    (never raised with a tolerance of 0, which asks for exactly that many steps)."""


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
        moves: BatchMoves | WaveMoves | None = None,
    ) -> None:
        if moves is not None and settings.full_batch != rule.monotone:
            raise ValueError(
                "split-and-merge moves need batch EM in full batches, or online EM / Adam on waves"
            )
        kind = BatchMoves if settings.full_batch else WaveMoves
        if moves is not None and not isinstance(moves, kind):
            raise ValueError(
                f"{type(moves).__name__} moves are not {kind.__name__} (update rule {rule.name!r})"
            )
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
    def start(self, params: Params, info: dict | None = None) -> LoopState:
        """The state before the first step (checked like every update)."""
        robust.check_params(params, "the initial parameters")
        state = LoopState(params=params, rule=self.rule.name, rule_state=self.rule.init(params))
        state.info = dict(info or {})
        if not self.settings.full_batch:
            state.order = epoch_order(self.settings.seed, 0, self._n_orderable)
        self._checkpoint(state)
        return state

    @property
    def _fixed(self) -> bool:
        """The rule needs the same waves every epoch (incremental EM), in a new order."""
        return bool(getattr(self.rule, "fixed_waves", False))

    def _settled(self, state: LoopState) -> bool:
        """The rule's own say on stopping (optional ``settled(rule_state)``; Adam: its rate has
        decayed): a flat epoch mean is not convergence while the rule's steps stay large."""
        settled = getattr(self.rule, "settled", None)
        return True if settled is None else bool(settled(state.rule_state))

    @property
    def _n_orderable(self) -> int:
        """What an epoch's order permutes: the strata, the fixed waves of units, or the units."""
        s = self.settings
        if s.strata is not None:
            return int(s.strata)
        return self.n_waves if self._fixed else self.source.n_units

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
        return state.converged or state.epoch >= s.epochs

    def _batch(self, state: LoopState) -> Batch:
        if self.settings.full_batch:
            return Batch(state.iteration + 1, state.iteration + 1, 1, None)
        if not state.order:
            state.order = epoch_order(self.settings.seed, state.epoch, self._n_orderable)
        fixed = {"draw": 0, "n_slots": self.n_waves} if self._fixed else {}
        if self.settings.strata is not None:
            s = int(state.order[state.wave])
            stratum = (s, int(self.settings.strata))
            slot = {"slot": s} if fixed else {}
            return Batch(
                state.iteration + 1, state.epoch + 1, state.wave + 1, None, stratum, **fixed, **slot
            )
        P = min(int(self.settings.wave_size), self.source.n_units)
        if fixed:  # waves are fixed runs of a fixed unit order; the epoch orders the waves
            g = int(state.order[state.wave])
            units = epoch_order(self.settings.seed, 0, self.source.n_units)[g * P : (g + 1) * P]
            return Batch(
                state.iteration + 1, state.epoch + 1, state.wave + 1, units, **fixed, slot=g
            )
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
        if not s.full_batch:
            self._final_pass(state)
        last = state.history[-1] if state.history else {}
        n_rows = int(state.counts.get("used", last.get("rows", 0)) or 0)
        if last.get("mean_loglike") is not None:
            robust.check_bulk(
                self.rule.name, state.params, last["mean_loglike"], n_rows, self.source
            )
        if not state.converged and s.tol > 0:
            self._warn_unconverged(state)
        state.finished = True
        self._checkpoint(state)
        return state

    def _warn_unconverged(self, state: LoopState) -> None:
        s = self.settings
        if s.full_batch:
            text = f"in {s.max_steps} iterations (tol={s.tol}); raise max_iter or tol"
        else:
            means = [h["epoch_mean_loglike"] for h in state.history if "epoch_mean_loglike" in h]
            change = abs(means[-1] - means[-2]) if len(means) > 1 else float("nan")
            text = (
                f"in {s.epochs} epochs: the epoch mean log-likelihood still changed by "
                f"{change:.3g} nats/row in the last epoch ({change / s.tol:.3g} x tol = {s.tol:g})"
            )
            if change < s.tol and not self._settled(state):
                text += ", but the rule's step size had not yet decayed (its steps still move"
                text += " the parameters by about the rate)"
            text += "; raise fit.epochs"
        warnings.warn(f"{self.rule.name} did not converge {text}", ConvergenceWarning, stacklevel=4)

    def _final_pass(self, state: LoopState) -> None:
        """One pass over every row at the final parameters (module docstring)."""
        t0 = time.perf_counter()
        batch = Batch(state.iteration + 1, state.epoch + 1, 0, extra=10**6)
        res = self.source(state.params, batch)
        stats = res.stats
        ll = stats.ll / stats.W if stats.W > 0 else float("nan")
        entry = {
            "iteration": state.iteration,
            "epoch": state.epoch,
            "final": True,
            "mean_loglike": ll,
            "rows": int(res.counts.get("used", stats.n_rows)),
            "seconds": time.perf_counter() - t0,
        } | res.info
        state.history.append(entry)
        state.counts = add_counts({}, res.counts)
        log.log(self.log_level, "final parameters: mean log-likelihood %.10g over every row", ll)

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
        after_move = bool(state.history and state.history[-1].get("moved"))
        prev = None
        if state.history and not after_move:
            prev = state.history[-1][self._ll_key]
        if s.full_batch and self.rule.monotone and prev is not None:
            if robust.is_catastrophic(prev, ll, s.max_ll_drop):
                self._diverged(state, batch, prev, ll)
            robust.note_decrease(prev, ll, state.history[-1].get("reseeded", []), batch.iteration)
        state.converged = s.full_batch and prev is not None and abs(ll - prev) < s.tol
        action, partial = Action.UPDATE, None
        if self.moves is not None:
            before, before_rule = state.params, state.rule_state
            if isinstance(self.moves, BatchMoves):
                action = self.moves.advance(state, ll, state.converged, s.max_steps)
                partial = self.moves.partial(state) if action is Action.PARTIAL else None
            else:
                action = self.moves.advance_wave(state, ll, batch, self._stats_at(batch))
            state.converged = action is Action.DONE
            if action is Action.MOVED:  # new parameters: no update from statistics at the old ones
                state.previous, state.previous_rule_state = before, before_rule
                state.rule_state = self.rule.init(state.params)
        t = state.iteration
        state.iteration += 1
        entry: dict[str, Any] = {
            "iteration": batch.iteration,
            "epoch": batch.epoch,
            "wave": batch.wave,
            self._ll_key: ll,
            "step": self.rule.step_size(t),
            "rows": int(res.counts.get("used", stats.n_rows)),
        }
        if batch.units is not None:
            entry["partitions"] = list(batch.units)
        if batch.stratum is not None:
            entry["stratum"] = list(batch.stratum)
        entry |= res.info
        entry["reseeded"] = []
        moved = action in (Action.MOVED, Action.RESTORED)
        if self.moves is not None:
            entry["split_merge"] = action.value
            entry["moved"] = moved
        if not moved and not state.converged and stats.W > 0:
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
            self._wave_done(state, res.counts, stats, entry)
        entry["seconds"] = time.perf_counter() - t0
        state.history.append(entry)
        self._checkpoint(state)
        self._log(entry, prev)
        if self.progress is not None:
            weights = [float(w) for w in np.asarray(state.params.weights)]
            self.progress(dict(entry, total=self.total, weights=weights))

    @property
    def _ll_key(self) -> str:
        """The history's name for a step's mean log-likelihood (module docstring)."""
        return "mean_loglike" if self.settings.full_batch else "wave_mean_loglike"

    def _wave_done(self, state: LoopState, counts: dict, stats: SuffStats, entry: dict) -> None:
        """Count a wave into its epoch; at the end of an epoch record the epoch mean
        log-likelihood, test convergence, start the next epoch's seeded order."""
        state.epoch_counts = add_counts(state.epoch_counts, counts)
        sums = state.epoch_sums
        sums["ll"] = float(sums.get("ll", 0.0)) + float(stats.ll)
        sums["W"] = float(sums.get("W", 0.0)) + float(stats.W)
        state.wave += 1
        if state.wave < self.n_waves:
            return
        mean = sums["ll"] / sums["W"] if sums["W"] > 0 else float("nan")
        before = [h["epoch_mean_loglike"] for h in state.history if "epoch_mean_loglike" in h]
        entry["epoch_mean_loglike"] = mean
        tol = self.settings.tol
        state.converged = (
            bool(before) and tol > 0 and abs(mean - before[-1]) < tol and self._settled(state)
        )
        log.log(
            self.log_level,
            "epoch %d: mean log-likelihood %.10g (change %.3g)",
            state.epoch + 1,
            mean,
            mean - before[-1] if before else float("nan"),
        )
        state.counts, state.epoch_counts, state.epoch_sums = state.epoch_counts, {}, {}
        state.epoch, state.wave, state.order = state.epoch + 1, 0, []

    def _stats_at(self, batch: Batch) -> Callable[[Params], SuffStats]:
        """``stats_at(params)``: statistics of ``batch``'s rows at other parameters, each call
        a pass of its own (a distinct label, so a cluster never reuses an earlier result)."""
        calls = [0]

        def stats_at(params: Params) -> SuffStats:
            calls[0] += 1
            return self.source(params, dataclasses.replace(batch, extra=calls[0])).stats

        return stats_at

    def _stats_full(self, batch: Batch) -> Callable[[Params], SuffStats]:
        """``full(params)``: statistics of every row at given parameters (a pass of its own)."""
        calls = [0]

        def full(params: Params) -> SuffStats:
            calls[0] += 1
            every = Batch(batch.iteration, batch.epoch, batch.wave, extra=1000 + calls[0])
            return self.source(params, every).stats

        return full

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
        epochs = tuple(h["epoch_mean_loglike"] for h in state.history if "epoch_mean_loglike" in h)
        data = StepData(stats, batch, self._stats_at(batch), self._stats_full(batch), epochs)
        try:
            rule_state, upd = self.rule.step(state.rule_state, data, state.params, t)
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
        ll = entry[self._ll_key]
        log.log(
            self.log_level,
            "%s: mean log-likelihood %.10g (change %.3g), step %.4g, rows %d, %.3f s",
            where,
            ll,
            ll - (float("nan") if prev is None else prev),
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

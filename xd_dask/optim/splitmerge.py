"""Split-and-merge EM (Ueda, Nakano, Ghahramani & Hinton 2000, "SMEM"; as used for XD by Bovy,
Hogg & Roweis 2011, section 2.3) as moves of the one fitting loop (:mod:`xd_dask.optim.loop`).

After batch EM converges, one pass over the data gives the criteria of
:mod:`xd_dask.optim.criteria` (merge: Ueda's normalised overlap of responsibilities; split: the
negentropy of the rows along a component's principal axis, not the local KL divergence, whose
-log n_j ranks the heavy component that covers two clumps last; DESIGN.md 4c).

Candidates (:func:`rank_candidates`, Bovy's hierarchy): merge pairs in decreasing J_merge; for
each pair, the other components in decreasing split score (:func:`split_score`); the first
``candidates`` triples (j, k, l) are tried in that order.

A move (:func:`propose`) merges j and k into one moment-matched component at index j, and
splits l along its principal axis into two halves (the re-seeding split,
:func:`xd_dask.optim.collapse.split_component`) at indices k and l. Partial EM
(:meth:`SplitMerge.restrict`) then updates only those three components with the others fixed
and their summed weight kept (the constrained M-step, which cannot lower the log-likelihood),
for ``partial_iter`` iterations (or until it settles); then full EM runs to convergence. The
move is accepted only if the converged mean log-likelihood exceeds the one before the move by
more than ``tol`` (> 0 with ``tol = 0``); else the parameters revert and the next candidate is
tried. The fit ends when no candidate is accepted (one last pass then scores the final
parameters) or after ``max_moves`` accepted moves.

The controller's state lives in ``LoopState.info["split_merge"]`` (JSON: phase, queue, the
parameters before the move as exact float lists), so a checkpoint resumes a fit mid-move
bit-identically.

Stochastic variant on waves (online EM, Adam; :class:`WaveSplitMerge`): every ``every`` waves
the criteria are computed on the current wave's rows only and the next untried candidate of that
ranking (the r-th after r rejections in a row) is applied, followed by ``partial_iter``
partial-EM iterations on the wave's rows (batch EM on that sample, the three components only;
one pass over the wave each); the rule's state is re-initialised at the moved parameters, and
the ordinary updates of the next ``trial_waves`` waves go on. On the wave after those, the moved
parameters' mean log-likelihood of the wave's rows (computed by the loop anyway) is compared
with the frozen parameters from before the move on the SAME rows (one extra pass): accepted when
it is higher by more than ``tol``, else the parameters and the rule's state revert. The frozen
parameters had no updates in the trial waves, which favours the move slightly when the fit is
still far from settled; ``tol`` is the margin. Moves stop after ``candidates`` rejections in a
row or ``max_moves`` accepted moves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from xd_dask.config import key
from xd_dask.optim.batch import batch_update
from xd_dask.optim.collapse import split_component
from xd_dask.optim.criteria import (
    MoveStats,
    merge_criterion,
    move_stats,
    rank_candidates,
    split_criterion,
    split_score,
)
from xd_dask.optim.robust import check_params
from xd_dask.optim.rules import Action, BatchMoves, Update, WaveMoves
from xd_dask.optim.steps import Batch, LoopState
from xd_dask.params import Params
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = [
    "MoveStats",
    "SplitMerge",
    "WaveSplitMerge",
    "array_criteria",
    "merge_criterion",
    "move_stats",
    "propose",
    "rank_candidates",
    "restrict",
    "split_criterion",
    "split_score",
]


def propose(params: Params, triple: tuple[int, int, int]) -> Params:
    """Merge j, k (moment-matched, at index j) and split l (principal axis, halves at k and
    l); the summed weight of the three is kept."""
    j, k, l = triple  # noqa: E741
    w, m, V = params.weights.copy(), params.means.copy(), params.covariances.copy()
    a = w[j] + w[k]
    fj, fk = (w[j] / a, w[k] / a) if a > 0 else (0.5, 0.5)
    mean = fj * m[j] + fk * m[k]
    dj, dk = m[j] - mean, m[k] - mean
    cov = fj * (V[j] + np.outer(dj, dj)) + fk * (V[k] + np.outer(dk, dk))
    delta, V_half = split_component(m[l], V[l])
    ml, wl = m[l].copy(), w[l]
    w[j], m[j], V[j] = a, mean, 0.5 * (cov + cov.T)
    w[k], m[k], V[k] = 0.5 * wl, ml + delta, V_half
    w[l], m[l], V[l] = 0.5 * wl, ml - delta, V_half.copy()
    return Params(w, m, V, params.background)


def restrict(new: Params, before: Params, triple: tuple[int, int, int]) -> Params:
    """Partial EM: ``new`` for the three components of a move, ``before`` for the others, and
    the three's summed weight of ``before`` (the background keeps its weight)."""
    idx = list(triple)
    w, m, V = before.weights.copy(), before.means.copy(), before.covariances.copy()
    new_w = new.weights[idx]
    total = float(np.sum(before.weights[idx]))
    s = float(np.sum(new_w))
    w[idx] = new_w * (total / s) if s > 0 else total / 3.0
    m[idx] = new.means[idx]
    V[idx] = new.covariances[idx]
    return Params(w, m, V, before.background)


def _note_move(
    sm: dict[str, Any], state: LoopState, what: str, before: float, after: float, accepted: bool
) -> None:
    """Record (in the controller's state) and log the verdict on the current move."""
    j, k, l = sm["current"]  # noqa: E741
    sm["moves"].append(
        {
            "iteration": state.iteration + 1,
            "merge": [j, k],
            "split": l,
            "ll_before": float(before),
            "ll_after": float(after),
            "accepted": bool(accepted),
        }
    )
    verdict = "accepted" if accepted else "rejected"
    log.info(
        "split-and-merge: merge %d+%d, split %d: %s %.10g -> %.10g (%s)",
        j,
        k,
        l,
        what,
        before,
        after,
        verdict,
    )


# ----------------------------------------------------------------------------- controller
#: ``criteria(params, batch)``: the sums over the batch's rows (every row when batch is None).
Criteria = Callable[[Params, Batch | None], MoveStats]


def _default(leaf: str) -> Any:
    return key(f"fit.split_merge_{leaf}").default


class SplitMerge(BatchMoves):
    """Split-and-merge moves for the fitting loop (module docstring).

    Parameters
    ----------
    criteria : ``criteria(params) -> MoveStats`` over every row (one pass).
    candidates : triples tried after each convergence before the fit ends.
    partial_iter : partial-EM iterations on the three components of a move.
    max_moves : stop after this many accepted moves.
    tol : a move is accepted when the converged mean log-likelihood rises by more than this.
    """

    def __init__(
        self,
        criteria: Criteria,
        candidates: int = _default("candidates"),
        partial_iter: int = _default("partial_iter"),
        max_moves: int = _default("max_moves"),
        tol: float = 0.0,
    ) -> None:
        if int(candidates) < 1 or int(partial_iter) < 1 or int(max_moves) < 1:
            raise ValueError("candidates, partial_iter and max_moves must be >= 1")
        self.criteria = criteria
        self.candidates = int(candidates)
        self.partial_iter = int(partial_iter)
        self.max_moves = int(max_moves)
        self.tol = float(tol)

    # ------------------------------------------------------------------ state
    @staticmethod
    def record(state: LoopState) -> dict[str, Any]:
        """The controller's JSON state inside ``state.info`` (created on first use)."""
        return state.info.setdefault(
            "split_merge",
            {
                "phase": "em",
                "run_iter": 0,
                "queue": [],
                "current": None,
                "base": None,
                "base_ll": None,
                "tried": 0,
                "accepted": 0,
                "moves": [],
            },
        )

    def max_total(self, max_steps: int) -> int:
        """A bound on the loop's steps: every EM run (the first, and one per candidate tried)
        has at most ``max_steps`` iterations (plus one scoring pass)."""
        runs = 1 + (self.max_moves + 1) * self.candidates
        return runs * (int(max_steps) + 1) + 1

    def partial(self, state: LoopState) -> tuple[int, int, int] | None:
        """The components partial EM updates this step (None: a full update)."""
        sm = self.record(state)
        return tuple(sm["current"]) if sm["phase"] == "partial" else None

    def restrict(self, upd: Update, before: Params, triple: tuple[int, int, int]) -> Update:
        """Partial EM (:func:`restrict`); re-seeding outside the three is dropped."""
        reseeded = [j for j in upd.reseeded if j in triple]
        return Update(restrict(upd.params, before, triple), reseeded, upd.step)

    # ------------------------------------------------------------------ decisions
    def advance(self, state: LoopState, ll: float, settled: bool, max_steps: int) -> Action:
        """Called by the loop with each step's mean log-likelihood (at ``state.params``) and
        whether the current EM run has settled (converged). Returns UPDATE (an ordinary
        update), PARTIAL (a partial-EM update), MOVED (``state.params`` were replaced: no update
        this step) or DONE (the fit is finished at ``state.params``)."""
        sm = self.record(state)
        sm["run_iter"] += 1
        if not settled and sm["run_iter"] >= int(max_steps):
            log.warning(
                "split-and-merge: an EM run (phase %s) stopped at max_iter = %d before it "
                "converged; judging it as it is",
                sm["phase"],
                int(max_steps),
            )
            settled = True
        phase = sm["phase"]
        if phase == "final":
            sm["phase"] = "done"
            return Action.DONE
        if phase == "partial":
            if settled or sm["run_iter"] >= self.partial_iter:
                sm["phase"], sm["run_iter"] = "full", 0
                return Action.UPDATE
            return Action.PARTIAL
        if not settled:
            return Action.UPDATE
        if phase == "em":
            return self._start(state, ll)
        # phase "full": decide the move
        gain = ll - sm["base_ll"]
        accepted = gain > self.tol
        _note_move(sm, state, "mean log-likelihood", sm["base_ll"], ll, accepted)
        if accepted:
            sm["accepted"] += 1
            if sm["accepted"] >= self.max_moves:
                sm["phase"] = "done"
                return Action.DONE
            return self._start(state, ll)
        state.params = Params.from_json(sm["base"])  # revert
        if not sm["queue"]:
            sm["phase"], sm["run_iter"], sm["current"] = "final", 0, None
            return Action.MOVED
        return self._next(state)

    def _start(self, state: LoopState, ll: float) -> Action:
        """Converged at ``state.params``: rank the candidates there and try the first."""
        sm = self.record(state)
        ms = self.criteria(state.params, None)
        sm["queue"] = [list(t) for t in rank_candidates(ms, self.candidates)]
        sm["base"], sm["base_ll"] = state.params.to_json(), float(ll)
        if not sm["queue"]:
            sm["phase"] = "done"
            return Action.DONE
        return self._next(state)

    def _next(self, state: LoopState) -> Action:
        sm = self.record(state)
        triple = tuple(sm["queue"].pop(0))
        sm["current"] = list(triple)
        sm["tried"] += 1
        sm["phase"], sm["run_iter"] = "partial", 0
        state.params = propose(Params.from_json(sm["base"]), triple)
        return Action.MOVED


def array_criteria(source: Any) -> Criteria:
    """The criteria over the rows of an :class:`xd_dask.optim.arrays.ArrayStatistics` (a
    batch's hash stratum, or every row)."""

    def criteria(params: Params, batch: Batch | None = None) -> MoveStats:
        rows = None if batch is None else source._rows(batch)

        def take(a: Any) -> Any:
            return a if a is None or rows is None else a[rows]

        return move_stats(
            take(source.X),
            take(source.X_cov),
            params,
            row_weights=take(source.row_weights),
            R=take(source.R),
            backend=source.backend,
            check=False,
        )

    return criteria


class WaveSplitMerge(WaveMoves):
    """Stochastic split-and-merge on waves for online EM and Adam (module docstring).

    Parameters
    ----------
    criteria : ``criteria(params, batch) -> MoveStats`` over a wave's rows.
    every : waves between move attempts.  trial_waves : updates before a move is judged.
    candidates : rejections in a row after which no more moves are tried.
    max_moves : accepted moves at most.  tol : acceptance margin (mean log-likelihood per row).
    partial_iter : partial-EM iterations on the wave's rows after a move.  reg_covar : theirs.
    """

    def __init__(
        self,
        criteria: Criteria,
        every: int,
        trial_waves: int = _default("trial_waves"),
        candidates: int = _default("candidates"),
        max_moves: int = _default("max_moves"),
        tol: float = 0.0,
        partial_iter: int = _default("partial_iter"),
        reg_covar: float = key("fit.reg_covar").default,
    ) -> None:
        if min(int(every), int(trial_waves), int(candidates), int(max_moves)) < 1:
            raise ValueError("every, trial_waves, candidates and max_moves must be >= 1")
        self.partial_iter = int(partial_iter)
        self.reg_covar = float(reg_covar)
        self.criteria = criteria
        self.every = int(every)
        self.trial_waves = int(trial_waves)
        self.candidates = int(candidates)
        self.max_moves = int(max_moves)
        self.tol = float(tol)

    @staticmethod
    def record(state: LoopState) -> dict[str, Any]:
        return state.info.setdefault(
            "split_merge",
            {
                "phase": "em",
                "waves": 0,
                "trial": 0,
                "rejected": 0,
                "accepted": 0,
                "tried": 0,
                "current": None,
                "base": None,
                "base_rule": None,
                "moves": [],
            },
        )

    def advance_wave(
        self, state: LoopState, ll: float, batch: Batch, stats_at: Callable[[Params], Any]
    ) -> Action:
        """Called by the loop with each wave's mean log-likelihood at ``state.params``;
        ``stats_at(params)`` gives the statistics (SuffStats) of the same rows at other
        parameters.
        Returns UPDATE, MOVED (new parameters: the loop re-initialises the rule's state) or
        RESTORED (parameters and rule state reverted here); no update after either."""
        sm = self.record(state)
        if sm["phase"] == "trial":
            sm["trial"] += 1
            if sm["trial"] <= self.trial_waves:
                return Action.UPDATE
            return self._judge(state, ll, stats_at)
        if sm["phase"] == "done":
            return Action.UPDATE
        sm["waves"] += 1
        if sm["waves"] < self.every:
            return Action.UPDATE
        sm["waves"] = 0
        ranked = rank_candidates(self.criteria(state.params, batch), sm["rejected"] + 1)
        if len(ranked) <= sm["rejected"]:
            sm["phase"] = "done"
            return Action.UPDATE
        triple = ranked[sm["rejected"]]
        sm["base"] = state.params.to_json()
        sm["base_rule"] = {k: np.asarray(v).tolist() for k, v in state.rule_state.items()}
        sm["current"], sm["tried"] = list(triple), sm["tried"] + 1
        sm["phase"], sm["trial"] = "trial", 0
        state.params = self._partial_em(propose(state.params, triple), triple, stats_at)
        return Action.MOVED

    def _partial_em(
        self, p: Params, triple: tuple[int, int, int], stats_at: Callable[[Params], Any]
    ) -> Params:
        """Partial EM on the wave's rows; stops early at a non-finite or non-positive-definite
        step (keeping the last good parameters)."""
        for _ in range(self.partial_iter):
            st = stats_at(p)
            if st.W <= 0:
                break
            new = restrict(batch_update(st, p, reg_covar=self.reg_covar).params, p, triple)
            try:
                check_params(new, "partial EM")
            except FloatingPointError:
                break
            p = new
        return p

    def _judge(self, state: LoopState, ll: float, stats_at: Callable[[Params], Any]) -> Action:
        sm = self.record(state)
        base = Params.from_json(sm["base"])
        st = stats_at(base)
        ll_base = st.ll / st.W if st.W > 0 else float("nan")
        accepted = ll - ll_base > self.tol
        _note_move(sm, state, "wave mean log-likelihood", ll_base, ll, accepted)
        sm["phase"], sm["current"] = "em", None
        if accepted:
            sm["accepted"] += 1
            sm["rejected"] = 0
            if sm["accepted"] >= self.max_moves:
                sm["phase"] = "done"
            return Action.UPDATE
        sm["rejected"] += 1
        if sm["rejected"] >= self.candidates:
            sm["phase"] = "done"
        state.params = base
        state.rule_state = {k: np.asarray(v) for k, v in sm["base_rule"].items()}
        return Action.RESTORED

"""Split-and-merge EM (Ueda, Nakano, Ghahramani & Hinton 2000, "SMEM"; as used for XD by Bovy,
Hogg & Roweis 2011, section 2.3) as moves of the one fitting loop (:mod:`xd_dask.optim.loop`).

After batch EM converges, one pass over the data (:func:`move_stats`, summed over rows like
every statistic) gives at the current parameters, with r_ij the responsibilities and w_i the row
weights:

- ``RR`` (K, K): sum_i w_i r_ij r_ik. The MERGE criterion is Ueda's normalised inner product of
  the responsibility vectors, J_merge(j, k) = RR_jk / sqrt(RR_jj RR_kk): two components that
  claim the same rows score near 1.
- ``ax`` (K, 4): sum_i w_i r_ij y_ij^p, p = 1..4, of the rows' standardised coordinate along the
  component's principal axis e_j (the top eigenvector of V_j, the axis a split divides along),
  y_ij = e_ij . (x_i - R_i m_j) / sqrt(e_ij . T_ij e_ij) with e_ij = R_i e_j on the observed
  fields: N(0, 1) for rows that the component describes. The SPLIT score is the negentropy of
  y under the component's rows (the Kullback-Leibler divergence from a Gaussian of the same
  variance, by the Gram-Charlier approximation of Jones & Sibson 1987), skew^2 / 12 +
  kurt^2 / 48, times the component's rows n_j: about the total log-likelihood a better
  description of its rows along that axis would gain (nats). A Gaussian component scores ~1
  (sampling noise: skew and kurtosis have variances 6 / n and 24 / n); one spread over two
  clumps 3 sigma apart has kurt ~ -0.96 and scores ~0.02 n_j.
- ``n`` (K,), ``flogf`` (K,), ``flogp`` (K,): sum_i w_i r_ij, sum_i w_i r_ij log(w_i r_ij) and
  sum_i w_i r_ij log N(x_i | R_i m_j, T_ij), for the former split criterion, the local
  Kullback-Leibler divergence with f_ij = w_i r_ij / n_j (:func:`split_criterion`, reported, no
  longer used to rank). Measured on a trap: that criterion carries -log n_j, so it ranks a
  heavy component low however badly it fits - and the component that covers two true clumps is
  usually the heaviest (DESIGN.md 4c): a known 8-component mixture (D = 4, two components 3
  sigma apart) started with the pair under one component and another clump doubled was left
  0.015 nats/row below the generating model with 5 candidates tried, none the pair's component.
  The merge criterion is Ueda's normalised form; Bovy's code uses the unnormalised RR_jk.

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
from dataclasses import dataclass
from typing import Any

import numpy as np

from xd_dask.config import key
from xd_dask.kernels import background_row_log_density, log_component_densities, move_sums
from xd_dask.kernels._common import to_numpy
from xd_dask.optim.batch import batch_update
from xd_dask.optim.collapse import split_component
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


# ----------------------------------------------------------------------------- criteria
@dataclass
class MoveStats:
    """Sums over rows for the split and merge criteria (module docstring); adds up."""

    RR: np.ndarray  # (K, K) sum w r_j r_k
    n: np.ndarray  # (K,) sum w r_j
    flogf: np.ndarray  # (K,) sum w r_j log(w r_j)
    flogp: np.ndarray  # (K,) sum w r_j log N_ij
    n_rows: int = 0
    ax: np.ndarray | None = None  # (K, 4) sum w r_j y_j^p, p = 1..4 (module docstring)

    @classmethod
    def zeros(cls, K: int) -> MoveStats:
        return cls(np.zeros((K, K)), np.zeros(K), np.zeros(K), np.zeros(K), 0, np.zeros((K, 4)))

    def __add__(self, other: MoveStats) -> MoveStats:
        ax = None if self.ax is None or other.ax is None else self.ax + other.ax
        return MoveStats(
            self.RR + other.RR,
            self.n + other.n,
            self.flogf + other.flogf,
            self.flogp + other.flogp,
            self.n_rows + other.n_rows,
            ax,
        )


#: Rows per block of :func:`axis_moments` (bounds its (rows, K, d) work arrays).
AXIS_CHUNK_ROWS = 2048


def principal_axes(covariances: np.ndarray) -> np.ndarray:
    """(K, D) unit eigenvectors of each covariance's largest eigenvalue."""
    _, vecs = np.linalg.eigh(np.asarray(covariances, dtype=np.float64))
    return vecs[:, :, -1]


def axis_moments(X: Any, X_cov: Any, params: Params, R: Any, wr: np.ndarray) -> np.ndarray:
    """(K, 4) sums of ``wr`` (n, K) times y^p, p = 1..4 (module docstring), over the rows X (n, d)
    with noise X_cov (n, d, d) (NaN = missing: the axis on the observed fields) and projections
    R (n, d, D) or None."""
    X = np.asarray(to_numpy(X), dtype=np.float64)
    S = np.asarray(to_numpy(X_cov), dtype=np.float64)
    if S.ndim == 2:  # packed lower triangles (the GPU layout)
        from xd_dask.kernels._common import unpack_lower  # noqa: PLC0415 - rare path

        S = np.asarray(unpack_lower(S))
    m = np.asarray(params.means, dtype=np.float64)
    V = np.asarray(params.covariances, dtype=np.float64)
    e = principal_axes(V)  # (K, D)
    out = np.zeros((m.shape[0], 4))
    for s in range(0, X.shape[0], AXIS_CHUNK_ROWS):
        sl = slice(s, s + AXIS_CHUNK_ROWS)
        obs = ~np.isnan(X[sl])  # (c, d)
        x = np.where(obs, X[sl], 0.0)
        Sc = S[sl] * (obs[:, :, None] & obs[:, None, :])
        if R is None:
            d = e[None, :, :] * obs[:, None, :]  # (c, K, d): the axis on the observed fields
            resid = (x[:, None, :] - m[None]) * obs[:, None, :]
            var = np.einsum("cka,kab,ckb->ck", d, V, d)
        else:
            Rc = np.asarray(to_numpy(R[sl]), dtype=np.float64) * obs[:, :, None]
            d = np.einsum("cij,kj->cki", Rc, e)
            resid = x[:, None, :] - np.einsum("cij,kj->cki", Rc, m)
            back = np.einsum("cij,cki->ckj", Rc, d)  # R^T d (c, K, D)
            var = np.einsum("cka,kab,ckb->ck", back, V, back)
        var = var + np.einsum("cka,cab,ckb->ck", d, Sc, d)
        y = np.einsum("cka,cka->ck", d, resid) / np.sqrt(np.maximum(var, 1e-300))
        w = wr[sl]
        for p in range(4):
            out[:, p] += np.sum(w * y ** (p + 1), axis=0)
    return out


def move_stats(
    X: Any,
    X_cov: Any,
    params: Params,
    *,
    row_weights: Any = None,
    R: Any = None,
    backend: str = key("fit.backend").default,
    check: bool = True,
) -> MoveStats:
    """The criteria's sums over the rows ``X`` (n, d), ``X_cov`` (n, d, d) (optional row weights
    (n,), projections R (n, d, D)) at ``params`` (a background takes its share of every row):
    the ``"moves"`` kernel (:func:`xd_dask.kernels.move_sums`, compiled on CPU and GPU), and the
    moments along each component's principal axis (:func:`axis_moments`), which need the
    responsibilities themselves (a second pass over the rows' log densities)."""
    ms = move_sums(X, X_cov, params, row_weights=row_weights, R=R, backend=backend, check=check)
    wr = _weighted_responsibilities(X, X_cov, params, row_weights, R, backend)
    ax = axis_moments(X, X_cov, params, R, wr)
    return MoveStats(ms.RR, ms["n"], ms["flogf"], ms["flogp"], ms.n_rows, ax)


def _weighted_responsibilities(
    X: Any, X_cov: Any, params: Params, row_weights: Any, R: Any, backend: str
) -> np.ndarray:
    """(n, K) w_i r_ij at ``params`` (the background takes its share of every row)."""
    logp = to_numpy(
        log_component_densities(X, X_cov, params, R=R, backend=backend, check=False)
    )  # (n, K) log alpha_j + log N_ij
    total = np.logaddexp.reduce(logp, axis=1)
    bg = params.background
    if bg is not None and bg.weight > 0:
        total = np.logaddexp(total, to_numpy(background_row_log_density(bg, X)))
    r = np.exp(logp - total[:, None])
    w = np.ones(r.shape[0]) if row_weights is None else np.asarray(row_weights, np.float64)
    return w[:, None] * r


def merge_criterion(ms: MoveStats) -> np.ndarray:
    """(K, K) J_merge(j, k) = RR_jk / sqrt(RR_jj RR_kk) (0 on the diagonal and for empty
    components)."""
    d = np.sqrt(np.clip(np.diag(ms.RR), 0.0, None))
    denom = d[:, None] * d[None, :]
    J = np.where(denom > 0, ms.RR / np.where(denom > 0, denom, 1.0), 0.0)
    np.fill_diagonal(J, 0.0)
    return J


def split_criterion(ms: MoveStats) -> np.ndarray:
    """(K,) local KL divergence J_split(j) = flogf_j / n_j - log n_j - flogp_j / n_j (-inf for
    an empty component)."""
    out = np.full(ms.n.shape, -np.inf)
    ok = ms.n > 0
    out[ok] = ms.flogf[ok] / ms.n[ok] - np.log(ms.n[ok]) - ms.flogp[ok] / ms.n[ok]
    return out


def split_score(ms: MoveStats) -> np.ndarray:
    """(K,) n_j x negentropy of the rows along the component's principal axis (module
    docstring): about the log-likelihood (nats) that splitting it could gain; -inf for an empty
    component."""
    out = np.full(ms.n.shape, -np.inf)
    ok = ms.n > 0
    n = ms.n[ok]
    s1, s2, s3, s4 = (ms.ax[ok, p] / n for p in range(4))
    var = np.maximum(s2 - s1**2, 1e-300)
    m3 = s3 - 3 * s1 * s2 + 2 * s1**3
    m4 = s4 - 4 * s1 * s3 + 6 * s1**2 * s2 - 3 * s1**4
    skew, kurt = m3 / var**1.5, m4 / var**2 - 3.0
    out[ok] = n * (skew**2 / 12.0 + kurt**2 / 48.0)
    return out


def rank_candidates(ms: MoveStats, limit: int) -> list[tuple[int, int, int]]:
    """The first ``limit`` triples (j, k, l) of Bovy's hierarchy: merge pairs by decreasing
    J_merge (ties: lower indices first), for each the other components by decreasing split
    score (:func:`split_score`)."""
    K = ms.n.shape[0]
    if K < 3:
        return []
    Jm, Js = merge_criterion(ms), split_score(ms)
    pairs = sorted(((j, k) for j in range(K) for k in range(j + 1, K)), key=lambda p: (-Jm[p], p))
    splits = sorted(range(K), key=lambda i: (-Js[i], i))
    out: list[tuple[int, int, int]] = []
    for j, k in pairs:
        for l in splits:  # noqa: E741 - Ueda's names
            if l not in (j, k):
                out.append((j, k, l))
                if len(out) >= limit:
                    return out
    return out


# ----------------------------------------------------------------------------- a move
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

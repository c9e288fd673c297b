"""Online EM over waves of rows (DESIGN.md section 4).

Two forms, chosen by ``fit.step.kind``:

* ``incremental`` (the default; Neal & Hinton 1998): the waves are the same every epoch (the loop
  draws them once, ``fixed_waves``) and the rule keeps each wave's newest batch-EM triple; every
  update pools all of them, so after the first epoch each update rests on every row and the fit
  converges like batch EM, with one update per wave. No step size to tune.
* ``power`` / ``halving`` (Cappe & Moulines 2009; the pooled form of Ritchie & Murray 2019,
  App. A): stochastic approximation, each wave's triple pooled into a running estimate with
  weights (1 - lambda_t, lambda_t).

State arrays (saved in checkpoints): ``s`` (K,), ``mu`` (K, D), ``sigma`` (K, D, D), ``s_bg`` ()
- the running (weight per row, mean, centred covariance) triples and the background's share;
incremental EM adds per wave ``slot_W`` (G,), ``slot_n`` (G, K), ``slot_mu`` (G, K, D),
``slot_sig`` (G, K, D, D) and ``slot_bg`` (G,) (row weight, component counts, means, centred
covariances, background count of its newest statistics; ``slot_W`` 0 = not visited yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xd_dask.config import key
from xd_dask.kernels import SuffStats
from xd_dask.optim.batch import batch_moments
from xd_dask.optim.collapse import (
    background_weight,
    check_reg,
    collapse_floor,
    is_pd,
    reseed_collapsed,
)
from xd_dask.optim.rules import StepData, Update
from xd_dask.optim.schedule import StepSchedule
from xd_dask.params import Params

__all__ = ["OnlineEM", "OnlineState", "Slots", "incremental_update", "online_update", "pool"]


@dataclass
class OnlineState:
    """Running estimate of online EM per component: (weight per row, mean, centred covariance),
    and the background's running share of the rows ``s_bg`` (0 without a background)."""

    s: np.ndarray  # (K,)
    mu: np.ndarray  # (K, D)
    sigma: np.ndarray  # (K, D, D)
    s_bg: float = 0.0

    @classmethod
    def from_params(cls, params: Params) -> OnlineState:
        return cls(
            np.array(params.weights, dtype=np.float64),
            np.array(params.means, dtype=np.float64),
            np.array(params.covariances, dtype=np.float64),
            params.background_weight,
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"s": self.s, "mu": self.mu, "sigma": self.sigma, "s_bg": np.array(self.s_bg)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> OnlineState:
        return cls(
            np.array(arrays["s"]),
            np.array(arrays["mu"]),
            np.array(arrays["sigma"]),
            float(arrays.get("s_bg", 0.0)),
        )


def pool(
    state: OnlineState,
    s_w: np.ndarray,
    mu_w: np.ndarray,
    sig_w: np.ndarray,
    step: float,
    s_bg_w: float = 0.0,
) -> OnlineState:
    """Pool the running triple with a wave's triple with weights (1 - step) and step (the
    background's share ``s_bg`` is pooled like the s_j)."""
    l = float(step)
    a_old = (1.0 - l) * state.s  # (K,)
    a_new = l * s_w
    s = a_old + a_new
    s_safe = np.where(s > 0, s, 1.0)
    mu = (a_old[:, None] * state.mu + a_new[:, None] * mu_w) / s_safe[:, None]
    d_old = state.mu - mu
    d_new = mu_w - mu
    sig = (
        a_old[:, None, None] * (state.sigma + d_old[:, :, None] * d_old[:, None, :])
        + a_new[:, None, None] * (sig_w + d_new[:, :, None] * d_new[:, None, :])
    ) / s_safe[:, None, None]
    sig = 0.5 * (sig + np.swapaxes(sig, 1, 2))
    mu = np.where((s > 0)[:, None], mu, state.mu)
    sig = np.where((s > 0)[:, None, None], sig, state.sigma)
    return OnlineState(s, mu, sig, (1.0 - l) * state.s_bg + l * float(s_bg_w))


def _wave_triple(
    stats: SuffStats, params: Params, min_count: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The wave's own batch-EM triple (n_j / W, m_j', V_j^EM); a component that got (almost) no
    rows in this wave contributes (almost) nothing: zero weight rather than 'collapsed'."""
    s_w, mu_w, sig_w, ok = batch_moments(stats, params, min_count)
    return np.where(ok, s_w, 0.0), mu_w, sig_w


def _finish_running(
    new: OnlineState,
    stats: SuffStats,
    params: Params,
    step: float,
    reg_covar: float,
    min_count: float | None,
) -> tuple[OnlineState, Update]:
    """Parameters from a running estimate: alpha = s / sum(s), m = mu, V = sigma + reg I, the
    background's weight from its share; components below the floor or not positive definite
    are reseeded (the returned state then holds the reseeded triples)."""
    background = params.background is not None
    V = new.sigma + reg_covar * np.eye(new.sigma.shape[-1])[None]
    ok_run = (new.s > collapse_floor(stats, min_count) / max(stats.W, 1e-300)) & is_pd(V)
    ok_run &= np.all(np.isfinite(new.mu), axis=1)
    w = np.where(ok_run, new.s, 0.0)
    if w.sum() <= 0:
        raise FloatingPointError("every mixture component collapsed")
    w_bg = background_weight(new.s_bg / (w.sum() + new.s_bg)) if background else 0.0
    w = w / w.sum() * (1.0 - w_bg)
    bg_w = w_bg if background else None
    if ok_run.all():
        return new, Update(params.with_gaussians(w, new.mu, V, bg_w), [], step)
    w, mu, V, reseeded = reseed_collapsed(w, new.mu, V, ~ok_run, 1.0 - w_bg)
    total = new.s.sum() + new.s_bg
    new = OnlineState(w * total, mu, V - reg_covar * np.eye(V.shape[-1])[None], new.s_bg)
    return new, Update(params.with_gaussians(w, mu, V, bg_w), reseeded, step)


def online_update(
    state: OnlineState | None,
    stats: SuffStats,
    params: Params,
    step: float,
    *,
    reg_covar: float = key("fit.reg_covar").default,
    min_count: float | None = None,
) -> tuple[OnlineState, Update]:
    """One online-EM step.

    The wave's own batch-EM triple (n_j / W, m_j', V_j^EM), computed from ``stats`` relative to
    ``params``, is pooled with the running ``state`` with weights (1 - step, step). Parameters
    are then alpha = s / sum(s), m = mu, V = sigma + reg I. With ``step = 1`` and a wave holding
    all rows this is exactly :func:`xd_dask.optim.batch.batch_update` (``reg_form="add"``).

    ``state`` None starts from ``params``. With a background component its share is pooled and
    its weight is s_bg / (sum(s) + s_bg). Returns the new state and the
    :class:`~xd_dask.optim.rules.Update` (step ``step``).
    """
    check_reg(reg_covar, "add")
    if not (0.0 < step <= 1.0):
        raise ValueError(f"step size must be in (0, 1], got {step!r}")
    if state is None:
        state = OnlineState.from_params(params)
    background = params.background is not None
    s_w, mu_w, sig_w = _wave_triple(stats, params, min_count)
    new = pool(state, s_w, mu_w, sig_w, step, stats.n_bg / stats.W if background else 0.0)
    return _finish_running(new, stats, params, step, reg_covar, min_count)


@dataclass
class Slots:
    """Incremental EM's memory: the newest statistics of each of the G fixed waves, as (row
    weight ``W``, component counts ``n``, means ``mu``, centred covariances ``sig``, background
    count ``bg``). ``W`` 0 marks a wave not visited yet."""

    W: np.ndarray  # (G,)
    n: np.ndarray  # (G, K)
    mu: np.ndarray  # (G, K, D)
    sig: np.ndarray  # (G, K, D, D)
    bg: np.ndarray  # (G,)

    @classmethod
    def empty(cls, n_slots: int, K: int, D: int) -> Slots:
        G = int(n_slots)
        return cls(
            np.zeros(G), np.zeros((G, K)), np.zeros((G, K, D)), np.zeros((G, K, D, D)), np.zeros(G)
        )

    def total(self) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, float]:
        """(W, n_j, mean_j, centred covariance_j, background count) over the visited waves:
        the statistics of every row seen, each at its wave's newest visit."""
        W = float(self.W.sum())
        n = self.n.sum(axis=0)  # (K,)
        n_safe = np.where(n > 0, n, 1.0)
        mu = np.einsum("gk,gkd->kd", self.n, self.mu) / n_safe[:, None]
        d = self.mu - mu[None]
        second = self.sig + d[..., :, None] * d[..., None, :]
        sig = np.einsum("gk,gkij->kij", self.n, second) / n_safe[:, None, None]
        sig = 0.5 * (sig + np.swapaxes(sig, 1, 2))
        return W, n, mu, sig, float(self.bg.sum())

    def reset(self, weights: np.ndarray, means: np.ndarray, sigma: np.ndarray, w_bg: float) -> None:
        """Make every visited wave's statistics agree with the given parameters (after a reseed:
        the collapsed components' old statistics describe nothing any more)."""
        seen = self.W > 0
        self.n[seen] = self.W[seen, None] * weights[None]
        self.mu[seen] = means[None]
        self.sig[seen] = sigma[None]
        self.bg[seen] = self.W[seen] * w_bg

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f"slot_{k}": getattr(self, k) for k in ("W", "n", "mu", "sig", "bg")}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Slots | None:
        if "slot_W" not in arrays or np.size(arrays["slot_W"]) == 0:
            return None
        return cls(*(np.array(arrays[f"slot_{k}"]) for k in ("W", "n", "mu", "sig", "bg")))


def incremental_update(
    slots: Slots,
    stats: SuffStats,
    params: Params,
    slot: int,
    *,
    reg_covar: float = key("fit.reg_covar").default,
    min_count: float | None = None,
) -> tuple[Slots, Update]:
    """One incremental-EM step (Neal & Hinton 1998): wave ``slot``'s statistics replace its
    previous ones in ``slots`` and the parameters come from the total over all waves seen, as
    batch EM's would (``reg_form="add"``). With one wave this is exactly
    :func:`xd_dask.optim.batch.batch_update`. Updates ``slots`` in place and returns it with
    the :class:`~xd_dask.optim.rules.Update` (its step is the wave's share of the rows)."""
    check_reg(reg_covar, "add")
    if not (0 <= slot < slots.W.shape[0]):
        raise ValueError(f"wave slot {slot} outside 0..{slots.W.shape[0] - 1}")
    s_w, mu_w, sig_w = _wave_triple(stats, params, min_count)
    background = params.background is not None
    slots.W[slot] = stats.W
    slots.n[slot] = s_w * stats.W
    slots.mu[slot] = mu_w
    slots.sig[slot] = sig_w
    slots.bg[slot] = stats.n_bg if background else 0.0
    W, n, mu, sig, n_bg = slots.total()
    running = OnlineState(n / W, mu, sig, n_bg / W)
    step = float(stats.W / W)
    new, upd = _finish_running(running, stats, params, step, reg_covar, min_count)
    if upd.reseeded:
        weights = np.asarray(upd.params.weights)
        w_bg = upd.params.background_weight
        slots.reset(weights, np.asarray(upd.params.means), new.sigma, w_bg)
    return slots, upd


class OnlineEM:
    """Online EM over waves: incremental (``schedule.kind == "incremental"``, the default; the
    loop then keeps the waves fixed across epochs) or stochastic approximation with step size
    ``schedule(t)``.

    Not monotone: each wave's log-likelihood is over different rows.
    """

    name = "online-em"
    monotone = False

    def __init__(
        self,
        schedule: StepSchedule | None = None,
        reg_covar: float = key("fit.reg_covar").default,
    ) -> None:
        check_reg(reg_covar, "add")
        self.schedule = schedule or StepSchedule()
        self.reg_covar = float(reg_covar)

    @property
    def fixed_waves(self) -> bool:
        """Incremental EM needs the same waves every epoch (in a new order)."""
        return self.schedule.kind == "incremental"

    def init(self, params: Params) -> dict[str, np.ndarray]:
        return OnlineState.from_params(params).to_arrays()

    def step_size(self, t: int) -> float:
        return self.schedule(t)

    def step(
        self, state: dict[str, np.ndarray], data: StepData, params: Params, t: int
    ) -> tuple[dict[str, np.ndarray], Update]:
        if self.fixed_waves:
            return self._incremental(state, data, params)
        running, upd = online_update(
            OnlineState.from_arrays(state),
            data.stats,
            params,
            self.schedule(t),
            reg_covar=self.reg_covar,
        )
        return running.to_arrays(), upd

    def _incremental(
        self, state: dict[str, np.ndarray], data: StepData, params: Params
    ) -> tuple[dict[str, np.ndarray], Update]:
        batch = data.batch
        if batch.slot is None or batch.n_slots < 1:
            raise ValueError(
                "incremental online EM needs fixed waves (a Batch with slot and n_slots, as "
                "FitLoop makes for a rule with fixed_waves)"
            )
        slots = Slots.from_arrays(state)
        if slots is None:
            slots = Slots.empty(batch.n_slots, params.n_components, params.n_features)
        if slots.W.shape[0] != batch.n_slots:
            raise ValueError(
                f"incremental online EM kept {slots.W.shape[0]} waves, the loop now has "
                f"{batch.n_slots}: resume with the wave settings of the checkpoint"
            )
        slots, upd = incremental_update(
            slots, data.stats, params, int(batch.slot), reg_covar=self.reg_covar
        )
        W, n, mu, sig, n_bg = slots.total()
        out = OnlineState(n / W, mu, sig, n_bg / W).to_arrays()
        out.update(slots.to_arrays())
        return out, upd

"""Online EM (Cappe & Moulines 2009; the pooled form of Ritchie & Murray 2019, App. A; DESIGN.md
section 4): each wave's batch-EM triple pooled into a running estimate.

State arrays (saved in checkpoints): ``s`` (K,), ``mu`` (K, D), ``sigma`` (K, D, D), ``s_bg`` ()
- the running (weight per row, mean, centred covariance) triples and the background's share.
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

__all__ = ["OnlineEM", "OnlineState", "online_update", "pool"]


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
    s_w, mu_w, sig_w, ok = batch_moments(stats, params, min_count)
    # A component that got (almost) no rows in this wave contributes (almost) nothing: give it
    # zero weight in the pool rather than calling it collapsed.
    s_w = np.where(ok, s_w, 0.0)
    new = pool(state, s_w, mu_w, sig_w, step, stats.n_bg / stats.W if background else 0.0)
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


class OnlineEM:
    """Pools each wave's batch-EM triple into a running estimate with step size ``schedule(t)``.

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

    def init(self, params: Params) -> dict[str, np.ndarray]:
        return OnlineState.from_params(params).to_arrays()

    def step_size(self, t: int) -> float:
        return self.schedule(t)

    def step(
        self, state: dict[str, np.ndarray], data: StepData, params: Params, t: int
    ) -> tuple[dict[str, np.ndarray], Update]:
        running, upd = online_update(
            OnlineState.from_arrays(state),
            data.stats,
            params,
            self.schedule(t),
            reg_covar=self.reg_covar,
        )
        return running.to_arrays(), upd

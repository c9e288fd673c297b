"""Online EM as an update rule (Cappe & Moulines 2009; :func:`xd_dask.em.online_update`).

State arrays (saved in checkpoints): ``s`` (K,), ``mu`` (K, D), ``sigma`` (K, D, D), ``s_bg`` ()
- the running (weight per row, mean, centred covariance) triples and the background's share.
"""

from __future__ import annotations

import numpy as np

from xd_dask.em import OnlineState, StepSchedule, online_update
from xd_dask.kernels import SuffStats
from xd_dask.optim.loop import Mixture, Update

__all__ = ["OnlineEM"]


class OnlineEM:
    """Pools each wave's batch-EM triple into a running estimate with step size ``schedule(t)``.

    Not monotone: each wave's log-likelihood is over different rows.
    """

    name = "online-em"
    monotone = False

    def __init__(self, schedule: StepSchedule | None = None, reg_covar: float = 1e-6) -> None:
        self.schedule = schedule or StepSchedule()
        self.reg_covar = float(reg_covar)

    def init(self, params: Mixture) -> dict[str, np.ndarray]:
        return OnlineState.from_params(
            params.weights, params.means, params.covariances, params.background_weight
        ).to_arrays()

    def step_size(self, t: int) -> float:
        return self.schedule(t)

    def step(
        self, state: dict[str, np.ndarray], stats: SuffStats, params: Mixture, t: int
    ) -> tuple[dict[str, np.ndarray], Update]:
        step = self.schedule(t)
        running, upd = online_update(
            OnlineState.from_arrays(state),
            stats,
            params.weights,
            params.means,
            params.covariances,
            step,
            reg_covar=self.reg_covar,
            background=params.background is not None,
        )
        new = params.updated(upd)
        return running.to_arrays(), Update(new, list(upd.reseeded), step)

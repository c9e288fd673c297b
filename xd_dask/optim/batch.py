"""Batch EM as an update rule (Bovy, Hogg & Roweis 2011; :func:`xd_dask.em.batch_update`)."""

from __future__ import annotations

import numpy as np

from xd_dask.em import _check_reg, batch_update
from xd_dask.kernels import SuffStats
from xd_dask.optim.loop import Mixture, Update

__all__ = ["BatchEM"]


class BatchEM:
    """One M-step per full pass; no state of its own; never lowers the log-likelihood beyond
    what re-seeding and regularisation explain (``monotone``).

    reg_covar, reg_form, min_count : see :mod:`xd_dask.em`.
    """

    name = "batch-em"
    monotone = True

    def __init__(
        self, reg_covar: float = 1e-6, reg_form: str = "add", min_count: float | None = None
    ) -> None:
        _check_reg(reg_covar, reg_form)
        self.reg_covar = float(reg_covar)
        self.reg_form = reg_form
        self.min_count = min_count

    def init(self, params: Mixture) -> dict[str, np.ndarray]:
        return {}

    def step_size(self, t: int) -> float:
        return 1.0

    def step(
        self, state: dict[str, np.ndarray], stats: SuffStats, params: Mixture, t: int
    ) -> tuple[dict[str, np.ndarray], Update]:
        upd = batch_update(
            stats,
            params.weights,
            params.means,
            params.covariances,
            reg_covar=self.reg_covar,
            reg_form=self.reg_form,
            min_count=self.min_count,
            background=params.background is not None,
        )
        new = params.updated(upd)
        return state, Update(new, list(upd.reseeded), 1.0)

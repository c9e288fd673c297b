"""Batch EM (Bovy, Hogg & Roweis 2011, centred form; DESIGN.md section 4): the update from
whole-data statistics, and the update rule that applies it once per full pass."""

from __future__ import annotations

import numpy as np

from xd_dask.config import key
from xd_dask.kernels import SuffStats
from xd_dask.optim.collapse import (
    REG_FORMS,
    background_weight,
    check_reg,
    collapse_floor,
    finish,
)
from xd_dask.optim.rules import StepData, Update
from xd_dask.params import Params

__all__ = ["BatchEM", "batch_moments", "batch_update"]


def batch_moments(
    stats: SuffStats,
    params: Params,
    min_count: float | None = None,
    support: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unregularised batch-EM triple (n_j / W, m_j', V_j^EM) in the centred form.

        m_j' = m_j + V_j abar_j,  V_j^EM = V_j + V_j (C_j / n_j - abar_j abar_j^T) V_j,
        abar_j = a_j / n_j

    Returns
    -------
    s : (K,) n_j / W;  mu : (K, D);  sigma : (K, D, D);  ok : (K,) bool, False where the component
    collapsed (n_j below the floor, or a non-finite / non-positive-definite result). Entries of
    collapsed components are filled with the old parameters (finite, never NaN).
    ``support`` applies the support floor (:mod:`xd_dask.optim.collapse`) when ``min_count`` is
    None.
    """
    if stats.W <= 0:
        raise ValueError("no rows (total weight 0): nothing to update from")
    means = np.asarray(params.means, dtype=np.float64)
    V = np.asarray(params.covariances, dtype=np.float64)
    n = stats.n
    ok = n > collapse_floor(stats, min_count, support)
    n_safe = np.where(ok, n, 1.0)
    abar = stats.a / n_safe[:, None]  # (K, D)
    mu = means + np.einsum("kij,kj->ki", V, abar)
    inner = stats.C / n_safe[:, None, None] - abar[:, :, None] * abar[:, None, :]  # (K, D, D)
    sigma = V + V @ inner @ V
    sigma = 0.5 * (sigma + np.swapaxes(sigma, 1, 2))
    finite = np.all(np.isfinite(mu), axis=1) & np.all(np.isfinite(sigma), axis=(1, 2))
    ok &= finite
    mu = np.where(ok[:, None], mu, means)
    sigma = np.where(ok[:, None, None], sigma, V)
    return n / stats.W, mu, sigma, ok


def batch_update(
    stats: SuffStats,
    params: Params,
    *,
    reg_covar: float = key("fit.reg_covar").default,
    reg_form: str = REG_FORMS[0],
    min_count: float | None = None,
) -> Update:
    """One batch-EM M-step from whole-data statistics at ``params``.

    reg_covar, reg_form : regularisation (:mod:`xd_dask.optim.collapse`).
    min_count : floor on n_j below which a component counts as collapsed (default: the support
        floor).
    With a background component (``params.background``) its weight becomes n_bg / W and the
    Gaussian weights sum to 1 - that. Returns the :class:`~xd_dask.optim.rules.Update` (new
    parameters, re-seeded components, step 1).
    """
    check_reg(reg_covar, reg_form)
    s, mu, sigma, ok = batch_moments(stats, params, min_count, support=True)
    w_bg = background_weight(stats.n_bg / stats.W) if params.background is not None else 0.0
    new, reseeded = finish(params, s, mu, sigma, ok, stats.n, reg_covar, reg_form, w_bg)
    return Update(new, reseeded, 1.0)


class BatchEM:
    """One M-step per full pass; no state of its own; never lowers the log-likelihood beyond
    what re-seeding and regularisation explain (``monotone``).

    reg_covar, reg_form, min_count : see :func:`batch_update`.
    """

    name = "batch-em"
    monotone = True

    def __init__(
        self,
        reg_covar: float = key("fit.reg_covar").default,
        reg_form: str = REG_FORMS[0],
        min_count: float | None = None,
    ) -> None:
        check_reg(reg_covar, reg_form)
        self.reg_covar = float(reg_covar)
        self.reg_form = reg_form
        self.min_count = min_count

    def init(self, params: Params) -> dict[str, np.ndarray]:
        return {}

    def step_size(self, t: int) -> float:
        return 1.0

    def step(
        self, state: dict[str, np.ndarray], data: StepData, params: Params, t: int
    ) -> tuple[dict[str, np.ndarray], Update]:
        upd = batch_update(
            data.stats,
            params,
            reg_covar=self.reg_covar,
            reg_form=self.reg_form,
            min_count=self.min_count,
        )
        return state, upd

"""The statistics source for arrays held in memory (what :class:`xd_dask.estimator.XDGMM` fits)."""

from __future__ import annotations

from typing import Any

import numpy as np

from xd_dask.config import key
from xd_dask.kernels import (
    check_rows,
    compute_stats,
    log_component_densities,
    row_log_likelihood,
)
from xd_dask.optim.steps import Batch, BatchStats
from xd_dask.optim.strata import EpochStrata
from xd_dask.params import Params

__all__ = ["ArrayStatistics", "rank_row_drops"]


def rank_row_drops(ll_before: np.ndarray, ll_after: np.ndarray | None, m: int) -> list[int]:
    """Indices of the (at most) ``m`` rows whose log-likelihood fell most, largest drop first
    (ties: lower index first); rows whose log-likelihood did not fall are never listed. With
    ``ll_after`` None: the ``m`` rows with the lowest ``ll_before``."""
    if ll_after is None:  # NaN counts as the lowest
        low = np.where(np.isnan(ll_before), -np.inf, ll_before)
        return [int(i) for i in np.lexsort((np.arange(low.shape[0]), low))[:m]]
    drop = ll_before - ll_after
    drop = np.where(np.isnan(drop), np.inf, drop)
    order = np.lexsort((np.arange(drop.shape[0]), -drop))[:m]
    return [int(i) for i in order if drop[i] > 0]


class ArrayStatistics:
    """Statistics of in-memory rows: one unit; a step sees every row, or with a stratified
    batch the rows of its hash stratum (:mod:`xd_dask.optim.strata`, the rows a catalogue on a
    cluster would give for the same ids and seed).

    X : (n, d), NaN = missing.  X_cov : (n, d, d).  row_weights : (n,) or None.
    R : (n, d, D) projections or None.  backend : kernel backend.
    ids : (n,) int64 row ids for the strata (default: row positions).  seed : the strata's seed.
    """

    n_units = 1

    def __init__(
        self,
        X: Any,
        X_cov: Any,
        row_weights: Any = None,
        R: Any = None,
        backend: str = key("fit.backend").default,
        ids: Any = None,
        seed: int = 0,
    ) -> None:
        self.X, self.X_cov, self.row_weights, self.R = X, X_cov, row_weights, R
        self.backend = backend
        self.ids = np.arange(np.shape(X)[0]) if ids is None else np.asarray(ids, dtype=np.int64)
        self.seed = int(seed)
        self._checked = False
        self._strata = EpochStrata(self.ids)

    def _rows(self, batch: Batch) -> np.ndarray | None:
        """The rows of the batch's stratum (None: every row); the strata of an epoch are
        computed once for its waves."""
        if batch.stratum is None:
            return None
        s, n_strata = batch.stratum
        return np.flatnonzero(self._strata(None, n_strata, self.seed, batch.drawn) == s)

    def __call__(self, params: Params, batch: Batch) -> BatchStats:
        if not self._checked:  # every row once, before any subset: errors name the user's row
            check_rows(self.X, self.X_cov, params, row_weights=self.row_weights, R=self.R)
            self._checked = True
        rows = self._rows(batch)

        def take(a: Any) -> Any:
            return a if a is None or rows is None else a[rows]

        stats = compute_stats(
            take(self.X),
            take(self.X_cov),
            params,
            row_weights=take(self.row_weights),
            R=take(self.R),
            backend=self.backend,
            check=False,
        )
        n = int(self.X.shape[0] if rows is None else rows.shape[0])
        return BatchStats(stats, {"read": n, "used": n, "dropped": {}})

    def _row_ll(self, p: Params) -> np.ndarray:
        return np.asarray(
            row_log_likelihood(
                self.X,
                self.X_cov,
                p,
                R=self.R,
                backend=self.backend,
            )
        )

    def rows_of(self, params: Params, component: int, m: int) -> list[dict]:
        """The ``m`` rows most responsible to ``component``."""
        with np.errstate(all="ignore"):
            ll = self._row_ll(params)
            logp = np.asarray(
                log_component_densities(self.X, self.X_cov, params, R=self.R, backend=self.backend)
            )
        r = np.exp(logp[:, int(component)] - ll)
        comp = np.argmax(logp, axis=1)
        return [
            {"row": int(i), "ll_before": float(ll[i]), "ll_after": None, "component": int(comp[i])}
            for i in np.argsort(-r, kind="stable")[: int(m)]
        ]

    def worst_rows(self, before: Params, after: Params | None, m: int) -> list[dict]:
        """The ``m`` rows whose log-likelihood fell most from ``before`` to ``after`` (``after``
        None: the ``m`` least likely rows at ``before``)."""
        with np.errstate(all="ignore"):  # diagnosing rows that overflow is the point here
            lb = self._row_ll(before)
            la = None if after is None else self._row_ll(after)
            logp = log_component_densities(
                self.X,
                self.X_cov,
                before,
                R=self.R,
                backend=self.backend,
            )
        comp = np.argmax(np.asarray(logp), axis=1)
        return [
            {
                "row": i,
                "ll_before": float(lb[i]),
                "ll_after": None if la is None else float(la[i]),
                "component": int(comp[i]),
            }
            for i in rank_row_drops(lb, la, m)
        ]

"""DaskXDGMM: the XDGMM estimator for rows held in dask arrays, fitted on a Dask cluster.

For users whose rows are not a Parquet catalogue (``xd-dask fit``, :func:`fit_catalog`) and do
not fit in one process (:class:`xd_dask.estimator.XDGMM`): ``X`` (n, D) and ``X_cov`` (n, D, D) as
dask arrays, dask-ml's convention. The settings, defaults and fitted attributes are XDGMM's; the
fit runs the one fitting loop (:class:`xd_dask.optim.FitLoop`) with the method of the method table
on :class:`xd_dask.distributed.arrays.ChunkStatistics` (one task per chunk, tree-reduced), started
by the same k-means over the chunks (or from an :class:`~xd_dask.model.XDModel`). From the same
start it equals XDGMM on the same rows, for batch EM, online EM and Adam alike::

    from distributed import Client
    client = Client()
    xd = DaskXDGMM(n_components=8, random_state=0).fit(X, X_cov)   # dask arrays
    xd.score_samples(X, X_cov)   # a dask array (n,)

Not here: projections R and split-and-merge (XDGMM in memory, or a catalogue); the client is the
default one (``distributed.get_client()``) unless ``fit(..., client=...)`` names another.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from distributed import get_client

from xd_dask.distributed.arrays import (
    ChunkStatistics,
    aligned,
    chunk_log_likelihood,
    chunk_responsibilities,
)
from xd_dask.estimator import XDGMM
from xd_dask.model import XDModel
from xd_dask.optim import FitLoop, bounding_box, method
from xd_dask.optim.kmeans import BACKGROUND_TRIM, default_sample_size, kmeans_start
from xd_dask.params import Background, Params

__all__ = ["DaskXDGMM"]


def _client(client: Any) -> Any:
    if client is not None:
        return client
    try:
        return get_client()
    except ValueError:
        raise ValueError(
            "DaskXDGMM needs a Dask cluster: create a distributed.Client() first, or pass "
            "fit(..., client=client)"
        ) from None


class DaskXDGMM(XDGMM):
    """Extreme Deconvolution on dask arrays (module docstring); parameters and attributes as
    :class:`xd_dask.estimator.XDGMM`."""

    def fit(
        self, X: Any, X_cov: Any = None, weights: Any = None, R: Any = None, *, client: Any = None
    ) -> DaskXDGMM:
        """Fit by the chosen method on the cluster of ``client`` (default: the current one).

        Parameters
        ----------
        X : dask array (n, D), NaN = missing (NumPy arrays are wrapped).
        X_cov : dask array (n, D, D).  weights : dask array (n,) of row weights, optional.
        """
        if R is not None:
            raise NotImplementedError("projections R: fit them with XDGMM, or as a catalogue")
        if X_cov is None:
            raise ValueError("X_cov is required: fit(X, X_cov) with X (n, D), X_cov (n, D, D)")
        if self.split_merge:
            raise ValueError("split_merge: use XDGMM in memory, or fit a catalogue")
        X, X_cov, weights = aligned(X, X_cov, weights)
        self._check_params(X)
        entry, seed = method(self.method), self._seed()
        source = ChunkStatistics(
            _client(client), X, X_cov, weights, backend=self.backend, seed=seed
        )
        try:
            start = self._start(source)
            settings, planned = self._schedule(entry, source.n_rows, seed)
            rule = entry.rule(self._settings(), planned)
            loop = FitLoop(rule, source, settings, log_level=logging.DEBUG)
            state = loop.run(loop.start(start))
        finally:
            source.close()
        self._fitted(state, entry)
        return self

    # ----------------------------------------------------------------- the fit
    def _start(self, source: ChunkStatistics) -> Params:
        """The start: the init model, or k-means over the chunks; a background's box from the
        k-means sample (as a catalogue's)."""
        bg, seen = self.background, {}

        def sample_pass(fraction: float):
            seen["sample"], n = source.sample_pass(fraction)
            return seen["sample"], n

        if isinstance(self.init, XDModel):
            start = self._model_start(source.n_features)
            if start.background is not None:
                return start
        else:
            start, _ = kmeans_start(
                sample_pass, source.lloyd_pass, source.n_rows, self.n_components, self._seed(),
                reg_covar=self.reg_covar, trim=BACKGROUND_TRIM if bg is not False else 0.0,
            )  # fmt: skip
        if bg is True:
            if "sample" not in seen:
                size = default_sample_size(self.n_components)
                sample_pass(min(1.0, size / max(source.n_rows, 1)))
            bg = Background(float(self.background_weight), *bounding_box(seen["sample"].sample))
        return self._add_background(start, bg)

    # ----------------------------------------------------------------- using (lazy)
    def _per_chunk(self, func: Any, X: Any, X_cov: Any, tail: tuple, dtype: Any) -> Any:
        """``func(x, s, params, backend)`` of every chunk, as one dask array of the rows."""
        import dask
        import dask.array as da  # noqa: PLC0415 - heavy; off the CLI's start-up path

        params = self._model().params
        X, X_cov, _ = aligned(X, X_cov)
        parts = [
            da.from_delayed(
                dask.delayed(func)(x, s, params, self.backend), shape=(int(n), *tail), dtype=dtype
            )
            for x, s, n in zip(
                X.to_delayed().ravel(), X_cov.to_delayed().ravel(), X.chunks[0], strict=True
            )
        ]
        return da.concatenate(parts, axis=0)

    def score_samples(self, X: Any, X_cov: Any = None, R: Any = None) -> Any:
        """dask array (n,): the log-likelihood of each noisy row (background included)."""
        if R is not None:
            raise NotImplementedError("projections R: use XDGMM")
        return self._per_chunk(chunk_log_likelihood, X, X_cov, (), np.float64)

    def score(self, X: Any, X_cov: Any = None, weights: Any = None, R: Any = None) -> float:
        """Mean log-likelihood per row (weighted by ``weights`` when given), computed."""
        import dask.array as da  # noqa: PLC0415 - heavy; off the CLI's start-up path

        ll = self.score_samples(X, X_cov, R)
        if weights is None:
            return float(ll.mean().compute())
        w = weights if isinstance(weights, da.Array) else da.from_array(np.asarray(weights))
        return float(((ll * w).sum() / w.sum()).compute())

    def predict_proba(self, X: Any, X_cov: Any = None) -> Any:
        """dask array (n, K): each row's responsibilities."""
        K = self.n_components
        return self._per_chunk(chunk_responsibilities, X, X_cov, (K,), np.float64)

    def predict(self, X: Any, X_cov: Any = None) -> Any:
        """dask array (n,): each row's most probable Gaussian component."""
        return self.predict_proba(X, X_cov).argmax(axis=1)

    def posterior(self, X: Any, X_cov: Any = None, R: Any = None):
        """Not lazy here: use ``xd.model_.posterior`` per chunk, or XDGMM in memory."""
        raise NotImplementedError(
            "DaskXDGMM.posterior: map xd.model_.posterior over your chunks (X.map_blocks), or "
            "write the rows to Parquet and run `xd-dask posterior`"
        )

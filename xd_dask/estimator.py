"""XDGMM: a scikit-learn Extreme Deconvolution estimator for in-memory arrays.

The estimator only wires the pieces: the fitting loop of :mod:`xd_dask.optim` (the same loop the
distributed fit runs) with batch EM (:class:`xd_dask.optim.BatchEM`) on in-memory statistics
(:class:`xd_dask.optim.ArrayStatistics`), initialised by k-means, or for projected rows by the
method of moments (:mod:`xd_dask.optim.init`; the start a cluster fit of the same rows gets).

It is a scikit-learn estimator (``clone``, ``get_params`` / ``set_params``, model selection).
Every row has its own noise covariance, so X and X_cov must be split together: :func:`pack`
stacks them into one (n, D + 1, D) array that scikit-learn's splitters index by row, and every
method that takes ``(X, X_cov)`` also takes the packed array alone::

    Z = pack(X, X_cov)
    GridSearchCV(XDGMM(), {"n_components": [2, 4, 8]}, cv=3).fit(Z)  # scored by XDGMM.score
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.utils.validation import check_is_fitted

from xd_dask.config import key
from xd_dask.kernels import Background
from xd_dask.model import XDModel
from xd_dask.optim import (
    MAX_LL_DROP,
    ArrayStatistics,
    BatchEM,
    ConvergenceWarning,
    FitLoop,
    LoopSettings,
    Mixture,
    initial_background,
)
from xd_dask.optim.background import confine
from xd_dask.optim.init import impute_column_means, kmeans_init, moment_init, params_from_labels

__all__ = [
    "XDGMM",
    "ConvergenceWarning",
    "impute_column_means",
    "kmeans_init",
    "pack",
    "params_from_labels",
    "unpack",
]


def pack(X: Any, X_cov: Any) -> np.ndarray:
    """Rows and their noise covariances as one array that row indexing keeps together.

    Parameters
    ----------
    X : (n, D) values, NaN = missing.  X_cov : (n, D, D) noise covariances.

    Returns
    -------
    (n, D + 1, D) array: ``[:, 0, :]`` is X, ``[:, 1:, :]`` is X_cov (:func:`unpack`).
    """
    X = np.asarray(X, dtype=np.float64)
    X_cov = np.asarray(X_cov, dtype=np.float64)
    if X.ndim != 2 or X_cov.shape != (X.shape[0], X.shape[1], X.shape[1]):
        raise ValueError(f"pack needs X (n, D) and X_cov (n, D, D), got {X.shape}, {X_cov.shape}")
    return np.concatenate([X[:, None, :], X_cov], axis=1)


def unpack(Z: Any) -> tuple[np.ndarray, np.ndarray]:
    """(X (n, D), X_cov (n, D, D)) from an array made by :func:`pack`."""
    Z = np.asarray(Z)
    if Z.ndim != 3 or Z.shape[1] != Z.shape[2] + 1:
        raise ValueError(f"a packed array has shape (n, D + 1, D), got {Z.shape}")
    return Z[:, 0, :], Z[:, 1:, :]


def _rows(X: Any, X_cov: Any) -> tuple[np.ndarray, np.ndarray]:
    """(X, X_cov) from the two arrays, or from a packed array (X_cov None)."""
    if X_cov is None:
        Z = np.asarray(X)
        if Z.ndim == 3:
            return unpack(Z)
        raise ValueError(
            "X_cov is required: pass fit(X, X_cov), or one packed array pack(X, X_cov) (shape "
            "(n, D + 1, D); what scikit-learn model selection needs)"
        )
    return np.asarray(X), np.asarray(X_cov)


class XDGMM(DensityMixin, BaseEstimator):
    """Extreme Deconvolution Gaussian mixture (Bovy, Hogg & Roweis 2011) for in-memory data.

    Parameters
    ----------
    n_components : int
    max_iter : int, maximum number of EM iterations (default: the job default ``fit.max_iter``).
    tol : float, convergence threshold on the change of the MEAN log-likelihood per row, nats
        (default ``fit.tol``; 0: run exactly ``max_iter`` iterations, without a
        ConvergenceWarning). The defaults converge on the real Gaia and Hipparcos samples
        (benchmarks/convergence.py).
    reg_covar : float, regularisation added to every covariance (see :mod:`xd_dask.em`).
    reg_form : "add" (default) or "bovy_w".
    init : "kmeans" or an :class:`XDModel` to start from. With projections R, "kmeans" means the
        method of moments (:func:`xd_dask.optim.init.moment_init`: k-means cannot run on
        projected rows), the start :func:`xd_dask.distributed.fit_catalog` gives the same rows.
    random_state : seed for the initialisation.
    backend : kernel backend, "auto" (compiled Numba on the CPU) or "reference".
    background : False (default), True (a uniform background component over the box of the
        bulk of the rows, :mod:`xd_dask.optim.background`, starting at ``background_weight``), or
        a :class:`xd_dask.kernels.Background` (its box and starting weight). The background absorbs
        a few absurd rows instead of giving them a component of their own; its weight is fitted,
        its box is fixed, and a k-means start is confined to the box.
    background_weight : starting weight of the background (``background=True``).
    max_ll_drop : largest accepted decrease of the mean log-likelihood per iteration (nats per
        row); a larger one rolls back and raises :class:`xd_dask.optim.FitDivergedError` naming
        the rows (:mod:`xd_dask.optim.robust`).
    split_merge : after convergence, try split-and-merge moves (:mod:`xd_dask.optim.splitmerge`;
        ``split_merge_candidates`` per convergence); ``max_iter`` then bounds each EM run and
        ``history_`` entries carry ``split_merge`` (the move phase), ``moves_`` the moves tried.

    Every method taking ``(X, X_cov)`` also takes one array made by :func:`pack` (X_cov omitted),
    which is what scikit-learn's model selection passes (``GridSearchCV(...).fit(pack(X, S))``
    scores each candidate by :meth:`score`, the mean log-likelihood per held-out row).

    Attributes
    ----------
    weights_ (K,), means_ (K, D), covariances_ (K, D, D), background_ (Background or None),
    converged_, n_iter_, history_ : one entry per iteration ({"iteration" (1-based),
    "mean_loglike" (at the parameters before that iteration's M-step), "rows", "seconds",
    "reseeded", ...}), lower_bound_ (the last mean_loglike), reseeded_ (list of (iteration,
    component)), model_ (XDModel).
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        max_iter: int = key("fit.max_iter").default,
        tol: float = key("fit.tol").default,
        reg_covar: float = 1e-6,
        reg_form: str = "add",
        init: str | XDModel = "kmeans",
        random_state: Any = None,
        backend: str = "auto",
        background: bool | Background = False,
        background_weight: float = 1e-3,
        max_ll_drop: float = MAX_LL_DROP,
        split_merge: bool = False,
        split_merge_candidates: int = key("fit.split_merge_candidates").default,
    ) -> None:
        self.n_components = n_components
        self.max_iter = max_iter
        self.tol = tol
        self.reg_covar = reg_covar
        self.reg_form = reg_form
        self.init = init
        self.random_state = random_state
        self.backend = backend
        self.background = background
        self.background_weight = background_weight
        self.max_ll_drop = max_ll_drop
        self.split_merge = split_merge
        self.split_merge_candidates = split_merge_candidates

    # ----------------------------------------------------------------- fitting
    def _check_params(self, X: np.ndarray) -> None:
        K = self.n_components
        if not isinstance(K, int | np.integer) or K < 1:
            raise ValueError(f"n_components must be a positive integer, got {K!r}")
        if K > X.shape[0]:
            raise ValueError(f"n_components={K} is larger than the number of rows ({X.shape[0]})")
        if not isinstance(self.max_iter, int | np.integer) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol!r}")
        if not self.max_ll_drop > 0:
            raise ValueError(f"max_ll_drop must be > 0, got {self.max_ll_drop!r}")
        if isinstance(self.init, str) and self.init != "kmeans":
            raise ValueError(f"init must be 'kmeans' or an XDModel, got {self.init!r}")

    def _initial(self, X: np.ndarray, X_cov: Any = None, R: Any = None) -> Mixture:
        bg = self.background
        D = X.shape[1] if R is None else np.shape(R)[2]
        if isinstance(self.init, XDModel):
            model = self.init
            if model.n_components != self.n_components or model.n_features != D:
                raise ValueError(
                    f"init model has K={model.n_components}, D={model.n_features}; "
                    f"expected K={self.n_components}, D={D}"
                )
            if model.background is not None and bg is False:
                raise ValueError("the init model has a background component: pass background=True")
            w, m, V = model.weights.copy(), model.means.copy(), model.covariances.copy()
            if model.background is not None and bg is True:
                return Mixture(w, m, V, model.background)
        elif R is not None:
            w, m, V = moment_init(X, X_cov, R, self.n_components, self.random_state, self.reg_covar)
        else:
            w, m, V = kmeans_init(X, self.n_components, self.random_state, self.reg_covar)
        if bg is False:
            return Mixture(w, m, V)
        if bg is True:
            bg = initial_background(X, self.background_weight)
        if not isinstance(bg, Background):
            raise ValueError(f"background must be True, False or a Background, got {bg!r}")
        if not isinstance(self.init, XDModel):
            m, V, _ = confine(m, V, bg)
        return Mixture(w * (1.0 - bg.weight), m, V, bg)

    def fit(self, X: Any, X_cov: Any = None, weights: Any = None, R: Any = None) -> XDGMM:
        """Fit by batch EM.

        Parameters
        ----------
        X : (n, d), NaN marks a missing field; or (n, d + 1, d) from :func:`pack` (X_cov None).
        X_cov : (n, d, d).  weights : (n,) row weights.
        R : (n, d, D) projection matrices, optional (d = D without). With projections the
            default start is the method of moments (k-means cannot run on projected rows); a
            background component is refused (its box would be in the observed space).
        """
        X, X_cov = _rows(X, X_cov)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-d (n_rows, n_features), got shape {X.shape}")
        self._check_params(X)
        if R is not None and self.background is not False:
            raise ValueError(
                "a background component cannot be used with projections R: its box would lie in "
                "the space of the d observed values, the model in the D true features; pass "
                "background=False"
            )
        start = self._initial(X, X_cov, R)
        source, moves = ArrayStatistics(X, X_cov, weights, R, self.backend), None
        if self.split_merge:  # split-and-merge (xd_dask.optim.splitmerge)
            from xd_dask.optim.splitmerge import SplitMerge, array_criteria  # noqa: PLC0415

            moves = SplitMerge(
                array_criteria(source),
                candidates=int(self.split_merge_candidates),
                partial_iter=key("fit.split_merge_partial_iter").default,
                max_moves=key("fit.split_merge_max_moves").default,
                tol=self.tol,
            )
        loop = FitLoop(
            BatchEM(self.reg_covar, self.reg_form),
            source,
            LoopSettings(max_steps=int(self.max_iter), tol=self.tol, max_ll_drop=self.max_ll_drop),
            log_level=logging.DEBUG,
            moves=moves,
        )
        state = loop.run(loop.start(start))
        self.moves_ = state.info.get("split_merge", {}).get("moves", [])
        p = state.params
        self.weights_, self.means_, self.covariances_ = p.weights, p.means, p.covariances
        self.background_ = p.background
        self.converged_ = bool(state.converged)
        self.history_ = state.history
        self.n_iter_ = len(state.history)
        self.lower_bound_ = state.history[-1]["mean_loglike"]
        self.reseeded_ = [(r["iteration"], j) for r in state.reseeded for j in r["components"]]
        self.model_ = XDModel(
            p.weights,
            p.means,
            p.covariances,
            metadata={
                "history": state.history,
                "converged": self.converged_,
                "n_iter": self.n_iter_,
                "reseeded": state.reseeded,
                "reg_covar": self.reg_covar,
                "reg_form": self.reg_form,
            },
            background=p.background,
        )
        return self

    # ----------------------------------------------------------------- using
    def _model(self) -> XDModel:
        """The fitted model (sklearn's NotFittedError, an AttributeError, before fit)."""
        check_is_fitted(self, "model_", msg="this XDGMM is not fitted yet; call fit(X, X_cov)")
        return self.model_

    def score_samples(self, X: Any, X_cov: Any = None, R: Any = None) -> np.ndarray:
        """(n,) log-likelihood of each noisy row under the fitted mixture (background included;
        R : (n, d, D) projections, optional)."""
        model = self._model()
        X, X_cov = _rows(X, X_cov)
        return np.asarray(model.log_density(X, X_cov, R=R, backend=self.backend))

    def score(self, X: Any, X_cov: Any = None, weights: Any = None, R: Any = None) -> float:
        """Mean log-likelihood per row (weighted by ``weights`` when given); higher is better,
        so it is what model selection maximises."""
        return float(np.average(self.score_samples(X, X_cov, R), weights=weights))

    def predict_proba(self, X: Any, X_cov: Any = None) -> np.ndarray:
        """(n, K) responsibilities (rows sum to 1 - the background's responsibility)."""
        model = self._model()
        X, X_cov = _rows(X, X_cov)
        return np.asarray(model.responsibilities(X, X_cov, backend=self.backend))

    def predict(self, X: Any, X_cov: Any = None) -> np.ndarray:
        """(n,) most probable Gaussian component."""
        return np.argmax(self.predict_proba(X, X_cov), axis=1)

    def posterior(self, X: Any, X_cov: Any = None, R: Any = None):
        """Deconvolved posterior mean (n, D) and covariance (n, D, D) of each row's true value
        (R : (n, d, D) projections, optional)."""
        model = self._model()
        return model.posterior(*_rows(X, X_cov), R=R)

    def sample(self, n_samples: int = 1, X_cov: Any = None, random_state: Any = None):
        """Draw (v (n, D), labels (n,)) from the fitted mixture, with noise N(0, S_i) if X_cov."""
        return self._model().sample(n_samples, random_state, X_cov=X_cov, return_labels=True)

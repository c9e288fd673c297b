"""XDGMM: a scikit-learn-style Extreme Deconvolution estimator for in-memory arrays.

The estimator only wires the pieces: statistics from :func:`xd_dask.kernels.compute_stats`, the
M-step from :func:`xd_dask.em.batch_update`, initialisation by k-means (k-means++ seeding).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from xd_dask.em import batch_update
from xd_dask.kernels import compute_stats, log_component_densities
from xd_dask.kernels import posterior as _posterior
from xd_dask.kernels.reference import _logsumexp_rows
from xd_dask.model import XDModel
from xd_dask.utils import get_logger

log = get_logger(__name__)


class ConvergenceWarning(UserWarning):
    """EM stopped at max_iter before the mean log-likelihood settled within tol."""


def impute_column_means(X: np.ndarray) -> np.ndarray:
    """Replace NaN (missing) fields by their column means; used only to initialise k-means."""
    X = np.array(X, dtype=np.float64)
    if np.isnan(X).any():
        col = np.nanmean(X, axis=0)
        if np.isnan(col).any():
            j = int(np.flatnonzero(np.isnan(col))[0])
            raise ValueError(f"column {j} is missing in every row")
        idx = np.nonzero(np.isnan(X))
        X[idx] = col[idx[1]]
    return X


def params_from_labels(
    X: np.ndarray, labels: np.ndarray, n_components: int, reg_covar: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights, means and scatter covariances of hard clusters (empty/tiny clusters fall back to
    the global scatter), for initialising XD from k-means."""
    n, D = X.shape
    glob = np.cov(X, rowvar=False).reshape(D, D) + reg_covar * np.eye(D)
    # A floor so that a cluster of identical points still has a positive definite covariance.
    floor = 1e-6 * np.diag(glob).mean() * np.eye(D) + reg_covar * np.eye(D)
    counts = np.bincount(labels, minlength=n_components).astype(np.float64)
    means = np.zeros((n_components, D))
    covs = np.zeros((n_components, D, D))
    for j in range(n_components):
        Xj = X[labels == j]
        if len(Xj) > D:
            means[j] = Xj.mean(axis=0)
            covs[j] = np.cov(Xj, rowvar=False) + floor
        elif len(Xj) > 0:
            means[j] = Xj.mean(axis=0)
            covs[j] = glob / n_components ** (2.0 / D) + floor
        else:
            means[j] = X.mean(axis=0)
            covs[j] = glob
    weights = np.maximum(counts, 1.0)
    return weights / weights.sum(), means, covs


def kmeans_init(
    X: np.ndarray, n_components: int, random_state: Any = None, reg_covar: float = 1e-6
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means (k-means++ seeding) on the noisy rows -> initial weights, means, covariances."""
    from sklearn.cluster import KMeans  # noqa: PLC0415 - only needed for this initialisation

    Xi = impute_column_means(X)
    seed = np.random.default_rng(random_state).integers(2**31 - 1)
    km = KMeans(n_clusters=n_components, init="k-means++", n_init=1, random_state=int(seed))
    labels = km.fit_predict(Xi)
    return params_from_labels(Xi, labels, n_components, reg_covar)


class XDGMM:
    """Extreme Deconvolution Gaussian mixture (Bovy, Hogg & Roweis 2011) for in-memory data.

    Parameters
    ----------
    n_components : int
    max_iter : int, maximum number of EM iterations.
    tol : float, convergence threshold on the change of the MEAN log-likelihood per row.
    reg_covar : float, regularisation added to every covariance (see :mod:`xd_dask.em`).
    reg_form : "add" (default) or "bovy_w".
    init : "kmeans" or an :class:`XDModel` to start from.
    random_state : seed for the initialisation.
    backend : kernel backend, "auto" (compiled Numba on the CPU) or "reference".

    Attributes
    ----------
    weights_ (K,), means_ (K, D), covariances_ (K, D, D), converged_, n_iter_,
    history_ : list of {"iteration", "mean_loglike", "seconds"} (mean log-likelihood at the
    parameters before each M-step), lower_bound_ (the last of those), reseeded_ (list of
    (iteration, component)), model_ (XDModel).
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        max_iter: int = 100,
        tol: float = 1e-6,
        reg_covar: float = 1e-6,
        reg_form: str = "add",
        init: str | XDModel = "kmeans",
        random_state: Any = None,
        backend: str = "auto",
    ) -> None:
        self.n_components = n_components
        self.max_iter = max_iter
        self.tol = tol
        self.reg_covar = reg_covar
        self.reg_form = reg_form
        self.init = init
        self.random_state = random_state
        self.backend = backend

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
        if isinstance(self.init, str) and self.init != "kmeans":
            raise ValueError(f"init must be 'kmeans' or an XDModel, got {self.init!r}")

    def _initial(self, X: np.ndarray):
        if isinstance(self.init, XDModel):
            if self.init.n_components != self.n_components or self.init.n_features != X.shape[1]:
                raise ValueError(
                    f"init model has K={self.init.n_components}, D={self.init.n_features}; "
                    f"expected K={self.n_components}, D={X.shape[1]}"
                )
            return self.init.weights.copy(), self.init.means.copy(), self.init.covariances.copy()
        return kmeans_init(X, self.n_components, self.random_state, self.reg_covar)

    def fit(self, X: Any, X_cov: Any, weights: Any = None, R: Any = None) -> XDGMM:
        """Fit by batch EM.

        Parameters
        ----------
        X : (n, d), NaN marks a missing field.  X_cov : (n, d, d).  weights : (n,) row weights.
        R : (n, d, D) projection matrices, optional (d = D without). With projections the
            initialisation must be an XDModel (k-means cannot run on projected rows).
        """
        X = np.asarray(X)
        X_cov = np.asarray(X_cov)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-d (n_rows, n_features), got shape {X.shape}")
        self._check_params(X)
        if R is not None and not isinstance(self.init, XDModel):
            raise ValueError("with projections R, pass init=XDModel(...) (k-means needs full rows)")
        w, m, V = self._initial(X if R is None else np.empty((0, self.init.n_features)))
        history: list[dict[str, float]] = []
        reseeded: list[tuple[int, int]] = []
        self.converged_ = False
        prev = -np.inf
        for it in range(self.max_iter):
            t0 = time.perf_counter()
            stats = compute_stats(
                X,
                X_cov,
                w,
                m,
                V,
                row_weights=weights,
                R=R,
                backend=self.backend,
                check=(it == 0),
            )
            ll = stats.mean_loglike
            if not np.isfinite(ll):
                raise FloatingPointError(f"mean log-likelihood is {ll} at iteration {it}")
            if abs(ll - prev) < self.tol:
                history.append(
                    {"iteration": it, "mean_loglike": ll, "seconds": time.perf_counter() - t0}
                )
                self.converged_ = True
                break
            prev = ll
            upd = batch_update(stats, w, m, V, reg_covar=self.reg_covar, reg_form=self.reg_form)
            w, m, V = upd.weights, upd.means, upd.covariances
            reseeded += [(it, j) for j in upd.reseeded]
            history.append(
                {"iteration": it, "mean_loglike": ll, "seconds": time.perf_counter() - t0}
            )
            log.debug("iteration %d: mean log-likelihood %.10g", it, ll)
        if not self.converged_:
            warnings.warn(
                f"XD EM did not converge in {self.max_iter} iterations (tol={self.tol}); "
                "raise max_iter or tol",
                ConvergenceWarning,
                stacklevel=2,
            )
        self.weights_, self.means_, self.covariances_ = w, m, V
        self.n_iter_ = len(history)
        self.history_ = history
        self.lower_bound_ = history[-1]["mean_loglike"]
        self.reseeded_ = reseeded
        self.model_ = XDModel(
            w,
            m,
            V,
            metadata={
                "history": history,
                "converged": self.converged_,
                "n_iter": self.n_iter_,
                "reseeded": reseeded,
                "reg_covar": self.reg_covar,
                "reg_form": self.reg_form,
            },
        )
        return self

    # ----------------------------------------------------------------- using
    def _fitted(self):
        if not hasattr(self, "weights_"):
            raise AttributeError("this XDGMM is not fitted yet; call fit(X, X_cov) first")
        return self.weights_, self.means_, self.covariances_

    def score_samples(self, X: Any, X_cov: Any) -> np.ndarray:
        """(n,) log-likelihood of each noisy row under the fitted mixture."""
        logp = log_component_densities(X, X_cov, *self._fitted(), backend=self.backend)
        return _logsumexp_rows(logp)

    def score(self, X: Any, X_cov: Any, weights: Any = None) -> float:
        """Mean log-likelihood per row (weighted by ``weights`` when given)."""
        return float(np.average(self.score_samples(X, X_cov), weights=weights))

    def predict_proba(self, X: Any, X_cov: Any) -> np.ndarray:
        """(n, K) responsibilities."""
        logp = log_component_densities(X, X_cov, *self._fitted(), backend=self.backend)
        return np.exp(logp - _logsumexp_rows(logp)[:, None])

    def predict(self, X: Any, X_cov: Any) -> np.ndarray:
        """(n,) most probable component."""
        return np.argmax(self.predict_proba(X, X_cov), axis=1)

    def posterior(self, X: Any, X_cov: Any):
        """Deconvolved posterior mean (n, D) and covariance (n, D, D) of each row's true value."""
        return _posterior(X, X_cov, *self._fitted())

    def sample(self, n_samples: int = 1, X_cov: Any = None, random_state: Any = None):
        """Draw (v (n, D), labels (n,)) from the fitted mixture, with noise N(0, S_i) if X_cov."""
        self._fitted()
        return self.model_.sample(n_samples, random_state, X_cov=X_cov, return_labels=True)

"""Initial parameters for arrays in memory: k-means (k-means++ seeding) on the noisy rows.

(A catalogue on a cluster is initialised by :mod:`xd_dask.distributed.kmeans`, the same idea as
map / tree-reduce passes.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["impute_column_means", "kmeans_init", "params_from_labels"]


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


def _global_scatter(X: np.ndarray) -> np.ndarray:
    """(D, D) scatter of all rows; a column without spread (or a single row) gets variance 1,
    as the distributed initialisation's unit scale does, so that it is never NaN or 0."""
    n, D = X.shape
    glob = np.cov(X, rowvar=False).reshape(D, D) if n > 1 else np.zeros((D, D))
    flat = ~(np.diagonal(glob) > 0)
    glob[flat, :] = 0.0
    glob[:, flat] = 0.0
    glob[flat, flat] = 1.0
    return glob


def params_from_labels(
    X: np.ndarray, labels: np.ndarray, n_components: int, reg_covar: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights, means and scatter covariances of hard clusters (empty/tiny clusters fall back to
    the global scatter), for initialising XD from k-means."""
    n, D = X.shape
    glob = _global_scatter(X) + reg_covar * np.eye(D)
    counts = np.bincount(labels, minlength=n_components).astype(np.float64)
    scatter = {
        j: np.cov(X[labels == j], rowvar=False).reshape(D, D)
        for j in range(n_components)
        if counts[j] > D
    }
    # A floor so that a cluster of identical points still has a positive definite covariance,
    # scaled by the typical cluster (not the global scatter, which one absurd row can inflate).
    scale = np.median([np.diag(c).mean() for c in scatter.values()]) if scatter else 0.0
    scale = scale if scale > 0 else np.diag(glob).mean()
    floor = 1e-6 * scale * np.eye(D) + reg_covar * np.eye(D)
    means = np.zeros((n_components, D))
    covs = np.zeros((n_components, D, D))
    for j in range(n_components):
        Xj = X[labels == j]
        if j in scatter:
            means[j] = Xj.mean(axis=0)
            covs[j] = scatter[j] + floor
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

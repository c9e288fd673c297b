"""Mixture parameters as the generated kernels read them (every backend packs through here).

One row per entry of :func:`xd_dask.kernels.codegen.algebra.param_rows`, one column per
component: the means, the packed lower covariances and the log weights (a zero weight as the
finite stand-in ``PAD_LOGW``), and for the posterior with unobserved fields the prior's
regression of those fields on the observed ones (:func:`.reference_posterior.
conditional_blocks`). The CPU backend lays the columns out in lane blocks, the GPU backend
takes the matrix as it is.
"""

from __future__ import annotations

import numpy as np

from xd_dask.kernels._common import tril
from xd_dask.kernels.codegen import algebra
from xd_dask.kernels.reference_posterior import conditional_blocks

__all__ = ["param_matrix"]


def param_matrix(log_weights, means, covs, obs=None, unobs=None) -> np.ndarray:
    """(n_par, K) float64 host matrix of the parameters.

    Without ``obs``: the rows of ``param_rows(D)`` of the (K, D) means and (K, D, D)
    covariances as given. With ``obs`` (d,) and ``unobs`` (du,) field indices (the posterior):
    the rows of ``param_rows(d, du)`` - m_o, packed V_oo, log alpha, then m_u, V_uo,
    G = V_uo V_oo^-1 and packed C = V_uu - V_uo V_oo^-1 V_ou.
    """
    means = np.asarray(means, dtype=np.float64)
    covs = np.asarray(covs, dtype=np.float64)
    K, D = means.shape
    obs = np.arange(D) if obs is None else np.asarray(obs)
    unobs = np.zeros(0, dtype=np.int64) if unobs is None else np.asarray(unobs)
    d, du = len(obs), len(unobs)
    lay = algebra.param_rows(d, du)
    P = np.empty((lay["n"], K))
    P[:d] = means[:, obs].T
    r, c = tril(d)
    P[lay["cov"] : lay["cov"] + algebra.npk(d)] = covs[:, obs[r], obs[c]].T
    P[lay["logw"]] = np.maximum(np.asarray(log_weights, dtype=np.float64), algebra.PAD_LOGW)
    if du:
        m_u, V_uo, G, C = conditional_blocks(means, covs, obs, unobs)
        P[lay["mu"] : lay["mu"] + du] = m_u.T
        P[lay["vuo"] : lay["vuo"] + du * d] = V_uo.reshape(K, -1).T
        P[lay["g"] : lay["g"] + du * d] = G.reshape(K, -1).T
        ru, cu = tril(du)
        P[lay["cu"] :] = C[:, ru, cu].T
    return P

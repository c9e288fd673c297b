"""Independent references for per-row posteriors (tests only).

``info_form_posterior``: the information form in noise-whitened coordinates - per row and
component, B = (V^-1 + R^T S^-1 R)^-1 with every inverse taken by Cholesky in coordinates where
the noise of an observed field (and the prior of an unobserved one) has unit variance, the mean
as the observed value minus a small correction, b = z - B V^-1 R^T w (z: x in the observed
slots, m in the others), and centred mixture moments from those corrections. It shares no
formula with the kernels (they use T = V + S and S T^-1), and needs S positive definite.

``textbook_posterior``: b = m + V R^T T^-1 w, B = V - V R^T T^-1 R V, per pair with
numpy.linalg, in float64: exact on well-scaled problems, cancels at Gaia scales.
"""

from __future__ import annotations

import math

import numpy as np


def _inv_spd(A: np.ndarray) -> np.ndarray:
    L = np.linalg.cholesky(A)
    Li = np.linalg.solve(L, np.eye(len(A)))
    return Li.T @ Li


def _logdet_spd(A: np.ndarray) -> float:
    return 2.0 * float(np.sum(np.log(np.diag(np.linalg.cholesky(A)))))


def _mix(logp, corr, covs, z):
    """Moment-matched mixture from per-component log weights, corrections c_j (b_j = z - c_j)
    and covariances B_j."""
    r = np.exp(logp - logp.max())
    r /= r.sum()
    cbar = r @ corr
    dev = cbar[None, :] - corr  # b_j - bbar
    cov = np.einsum("k,kab->ab", r, covs) + np.einsum("k,ka,kb->ab", r, dev, dev)
    return z - cbar, cov, r


def info_form_posterior(X, S, weights, means, covs):
    """(mean (n, D), cov (n, D, D), resp (n, K)) in float64; NaN in X marks a missing field."""
    X = np.asarray(X, np.float64)
    S = np.asarray(S, np.float64)
    n, D = X.shape
    K = len(weights)
    mean, cov, resp = np.empty((n, D)), np.empty((n, D, D)), np.empty((n, K))
    for i in range(n):
        o = ~np.isnan(X[i])
        R = np.eye(D)[o]
        sig = np.sqrt(np.diag(S[i][np.ix_(o, o)]))
        Sw = S[i][np.ix_(o, o)] / np.outer(sig, sig)  # a correlation matrix
        Sw_inv = _inv_spd(Sw)
        logp, corr, Bs = np.empty(K), np.empty((K, D)), np.empty((K, D, D))
        for j in range(K):
            s = np.empty(D)  # whitening scale per field
            s[o] = 1.0 / sig
            s[~o] = 1.0 / np.sqrt(np.diag(covs[j])[~o])
            Vw = covs[j] * np.outer(s, s)
            ww = (X[i, o] - means[j, o]) * s[o]
            Vw_inv = _inv_spd(Vw)
            Bw = _inv_spd(Vw_inv + R.T @ Sw_inv @ R)
            corr[j] = (Bw @ Vw_inv @ R.T @ ww) / s
            Bs[j] = Bw / np.outer(s, s)
            Tw = R @ Vw @ R.T + Sw
            maha = float(ww @ _inv_spd(Tw) @ ww)
            logp[j] = (
                math.log(weights[j])
                - 0.5 * (o.sum() * math.log(2 * math.pi) + _logdet_spd(Tw) + maha)
                + float(np.sum(np.log(s[o])))
            )
        z = np.where(o, X[i], 0.0)
        # b_j = z_j - c_j with z_j = x (observed) / m_j (unobserved): fold m_j into c_j there.
        corr[:, ~o] -= means[:, ~o]
        mean[i], cov[i], resp[i] = _mix(logp, corr, Bs, z)
    return mean, cov, resp


def textbook_posterior(X, S, weights, means, covs, R=None):
    """(mean (n, D), cov (n, D, D)) from the textbook per-pair formulas (numpy.linalg)."""
    X = np.asarray(X, np.float64)
    S = np.asarray(S, np.float64)
    n = X.shape[0]
    K, D = means.shape
    mean, cov = np.empty((n, D)), np.empty((n, D, D))
    for i in range(n):
        o = ~np.isnan(X[i])
        Ri = (np.eye(D) if R is None else R[i])[o]
        x, Si = X[i, o], S[i][np.ix_(o, o)]
        logp, bs, Bs = np.empty(K), np.empty((K, D)), np.empty((K, D, D))
        for j in range(K):
            T = Ri @ covs[j] @ Ri.T + Si
            Ti = np.linalg.inv(T)
            w = x - Ri @ means[j]
            logp[j] = math.log(weights[j]) - 0.5 * (
                np.linalg.slogdet(2 * math.pi * T)[1] + w @ Ti @ w
            )
            gain = covs[j] @ Ri.T @ Ti
            bs[j] = means[j] + gain @ w
            Bs[j] = covs[j] - gain @ Ri @ covs[j]
        r = np.exp(logp - logp.max())
        r /= r.sum()
        mean[i] = r @ bs
        dev = bs - mean[i]
        cov[i] = np.einsum("k,kab->ab", r, Bs) + np.einsum("k,ka,kb->ab", r, dev, dev)
    return mean, cov

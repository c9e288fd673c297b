"""Seeded data helpers shared by the tests: random SPD matrices, known mixtures, noisy draws."""

from __future__ import annotations

import numpy as np


def random_spd(rng: np.random.Generator, n: int, d: int, scale=1.0, cond: float = 10.0):
    """(n, d, d) random SPD matrices with eigenvalues in [scale/cond, scale] (scale per matrix)."""
    Q, _ = np.linalg.qr(rng.normal(size=(n, d, d)))
    ev = (
        rng.uniform(1.0 / cond, 1.0, size=(n, d))
        * np.broadcast_to(np.asarray(scale), (n,))[:, None]
    )
    return np.einsum("nij,nj,nkj->nik", Q, ev, Q)


def random_params(rng: np.random.Generator, K: int, D: int, spread: float = 3.0):
    w = rng.dirichlet(np.full(K, 5.0))
    m = rng.normal(scale=spread, size=(K, D))
    V = random_spd(rng, K, D, scale=rng.uniform(0.5, 2.0, size=K))
    return w, m, V


def known_mixture_3d():
    """A 3-component mixture in D = 3 with distinct, correlated components."""
    w = np.array([0.5, 0.3, 0.2])
    m = np.array([[0.0, 0.0, 0.0], [6.0, 2.0, -3.0], [-4.0, 5.0, 4.0]])
    V = np.array(
        [
            [[2.0, 0.8, 0.0], [0.8, 1.5, 0.3], [0.0, 0.3, 1.0]],
            [[1.0, -0.4, 0.2], [-0.4, 2.5, 0.0], [0.2, 0.0, 0.8]],
            [[1.5, 0.0, 0.6], [0.0, 0.7, -0.2], [0.6, -0.2, 2.0]],
        ]
    )
    return w, m, V


def draw_noisy(rng, w, m, V, n, noise_scale=1.0):
    """Draw true values from the mixture, heteroscedastic correlated noise S_i, noisy x_i."""
    K, D = m.shape
    labels = rng.choice(K, size=n, p=w)
    v = m[labels] + np.einsum("nij,nj->ni", np.linalg.cholesky(V)[labels], rng.normal(size=(n, D)))
    S = random_spd(rng, n, D, scale=noise_scale * rng.uniform(0.3, 1.7, size=n), cond=5.0)
    x = v + np.einsum("nij,nj->ni", np.linalg.cholesky(S), rng.normal(size=(n, D)))
    return x, S, v, labels


def loop_stats(X, S, w, m, V, row_weights=None, R=None):
    """Direct double loop over (row, component) with numpy.linalg: (n_j, a, C, ll, W).

    Missing fields (NaN) are handled by dropping the rows of R_i (R_i = I without projections).
    """
    n = X.shape[0]
    K, D = m.shape
    rw = np.ones(n) if row_weights is None else row_weights
    nj, a, C, ll = np.zeros(K), np.zeros((K, D)), np.zeros((K, D, D)), 0.0
    for i in range(n):
        o = ~np.isnan(X[i])
        Ri = (np.eye(D) if R is None else R[i])[o]
        x = X[i, o]
        Si = S[i][np.ix_(o, o)]
        logp = np.empty(K)
        us, Tis = [], []
        for j in range(K):
            T = Ri @ V[j] @ Ri.T + Si
            Ti = np.linalg.inv(T)
            r = x - Ri @ m[j]
            sign, logdet = np.linalg.slogdet(T)
            assert sign > 0
            logp[j] = np.log(w[j]) - 0.5 * (len(x) * np.log(2 * np.pi) + logdet + r @ Ti @ r)
            us.append(Ti @ r)
            Tis.append(Ti)
        mx = logp.max()
        lse = mx + np.log(np.exp(logp - mx).sum())
        resp = np.exp(logp - lse)
        ll += rw[i] * lse
        for j in range(K):
            nj[j] += rw[i] * resp[j]
            a[j] += rw[i] * resp[j] * Ri.T @ us[j]
            C[j] += rw[i] * resp[j] * Ri.T @ (np.outer(us[j], us[j]) - Tis[j]) @ Ri
    return nj, a, C, ll, rw.sum()

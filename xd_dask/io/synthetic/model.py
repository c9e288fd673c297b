"""The generating mixture of a synthetic catalogue and draws of true values from it.

True values v = (ra, dec, parallax, pmra, pmdec, bp_rp, phot_g_mean_mag), in the units of the
default schema, come from a 6-component Gaussian mixture loosely modelled on Gaia populations
(two broad field components, a bulge, an LMC-like cloud, two open clusters; :func:`true_mixture`).
Sky positions outside ra in [DELTA, 360 - DELTA], |dec| <= 90 - DELTA are rejected and redrawn
(DELTA = 1e-4 deg keeps the observed positions, true + mas-level noise, inside the Gaia ranges).
The components are chosen so that this truncation removes little mass: the written model is the
untruncated mixture and the rejected mass of each component is recorded in its metadata
(``truncated_mass``; about 6e-4 of all draws).
"""

from __future__ import annotations

import math

import numpy as np

from xd_dask.io.synthetic.columns import SCHEMA
from xd_dask.model import XDModel
from xd_dask.params import Params

__all__ = ["DELTA", "star_clusters", "true_mixture"]

#: Margin (deg) kept between true positions and the ends of the ra/dec ranges.
DELTA = 1e-4

# name, weight, mean (7), sd (7), correlations {(i, j): r}
_BROAD_COMPONENTS = [
    (
        "field disc",
        0.46,
        (180.0, 0.0, 1.0, -2.0, -3.0, 1.1, 17.8),
        (50.0, 25.0, 0.6, 5.0, 5.0, 0.35, 1.4),
        {(2, 6): -0.3, (3, 4): 0.2, (2, 4): -0.2, (5, 6): 0.2},
    ),
    (
        "thick disc / halo",
        0.26,
        (180.0, -5.0, 0.35, -3.0, -5.0, 0.95, 18.8),
        (45.0, 25.0, 0.3, 12.0, 12.0, 0.3, 1.2),
        {(2, 6): -0.2, (3, 4): 0.1},
    ),
    (
        "bulge",
        0.12,
        (266.4, -29.0, 0.12, -2.7, -7.0, 1.8, 18.6),
        (4.0, 3.5, 0.1, 2.8, 2.6, 0.4, 1.0),
        {(5, 6): 0.3, (3, 4): -0.1},
    ),
    (
        "LMC-like cloud",
        0.08,
        (80.9, -69.8, 0.02, 1.85, 0.3, 0.85, 19.3),
        (3.0, 1.6, 0.04, 0.35, 0.4, 0.35, 0.8),
        {(0, 3): 0.3, (1, 4): 0.3},
    ),
    (
        "open cluster A (Pleiades-like)",
        0.04,
        (56.75, 24.12, 7.35, 19.95, -45.4, 1.4, 14.5),
        (1.0, 1.0, 0.2, 1.2, 1.2, 0.6, 2.0),
        {(5, 6): 0.9},
    ),
    (
        "open cluster B (Praesepe-like)",
        0.04,
        (130.1, 19.67, 5.37, -36.1, -12.9, 1.3, 14.8),
        (1.2, 1.2, 0.15, 1.0, 1.0, 0.5, 1.8),
        {(5, 6): 0.85},
    ),
]


def star_clusters(n: int, seed: int) -> list[tuple]:
    """``n`` compact, open-cluster-like components spread over the sky, in parallax, proper
    motion and the colour-magnitude diagram (the structured mixture of many components that a
    K = 64 / 128 benchmark needs): (name, weight, mean, sd, correlations) as in
    :func:`true_mixture`; weights sum to 1 before scaling."""
    rng = np.random.default_rng([int(seed), 29])
    w = rng.uniform(0.5, 1.5, n)
    out = []
    for i in range(n):
        plx = float(np.exp(rng.uniform(np.log(0.4), np.log(6.0))))
        mean = (
            float(rng.uniform(20.0, 340.0)),
            float(np.degrees(np.arcsin(rng.uniform(-0.85, 0.85)))),
            plx,
            float(rng.normal(0.0, 15.0)),
            float(rng.normal(0.0, 15.0)),
            float(rng.uniform(0.5, 2.0)),
            float(rng.uniform(12.0, 18.0)),
        )
        sd = (1.0, 1.0, 0.06 * plx, 0.6, 0.6, 0.3, 1.2)
        out.append((f"cluster {i}", float(w[i] / w.sum()), mean, sd, {(5, 6): 0.85}))
    return out


def true_mixture(n_clusters: int = 0, seed: int = 0, cluster_weight: float = 0.3) -> XDModel:
    """The generating mixture over (ra, dec, parallax, pmra, pmdec, bp_rp, phot_g_mean_mag): six
    broad components (disc, halo, bulge, a cloud, two open clusters) and, with ``n_clusters``,
    that many more compact clusters (:func:`star_clusters`, ``seed``) holding
    ``cluster_weight`` of the stars together."""
    comps = list(_BROAD_COMPONENTS)
    if n_clusters:
        comps = [(c[0], c[1] * (1.0 - cluster_weight), *c[2:]) for c in comps]
        comps += [(c[0], c[1] * cluster_weight, *c[2:]) for c in star_clusters(n_clusters, seed)]
    weights, means, covs, trunc = [], [], [], []
    for _, w, m, sd, corr in comps:
        R = np.eye(7)
        for (i, j), r in corr.items():
            R[i, j] = R[j, i] = r
        sd_ = np.asarray(sd)
        weights.append(w)
        means.append(m)
        covs.append(R * np.outer(sd_, sd_))
        trunc.append(_truncated_mass(m[0], sd[0], m[1], sd[1]))
    meta = {
        "generator": "xd_dask.io.synthetic.true_mixture",
        "components": [c[0] for c in comps],
        "units": list(SCHEMA.units),
        "truncation": {"ra": [DELTA, 360.0 - DELTA], "dec": [-90.0 + DELTA, 90.0 - DELTA]},
        "truncated_mass": trunc,
        "note": "generating mixture of the TRUE values before rejection of sky positions "
        "outside the truncation box (rejected mass per component: truncated_mass)",
    }
    return XDModel(
        Params(np.array(weights), np.array(means), np.array(covs)),
        feature_names=list(SCHEMA.features),
        metadata=meta,
    )


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _truncated_mass(ra_m: float, ra_s: float, dec_m: float, dec_s: float) -> float:
    """Mass outside the sky box of a component with uncorrelated ra and dec."""
    p_ra = _phi((360.0 - DELTA - ra_m) / ra_s) - _phi((DELTA - ra_m) / ra_s)
    p_dec = _phi((90.0 - DELTA - dec_m) / dec_s) - _phi((-90.0 + DELTA - dec_m) / dec_s)
    return float(1.0 - p_ra * p_dec)


def draw_true(rng: np.random.Generator, n: int, model: XDModel) -> np.ndarray:
    """(n, 7) i.i.d. draws from the mixture truncated to the sky box (rejection)."""
    L = np.linalg.cholesky(model.covariances)
    cum = np.cumsum(model.weights)
    out = np.empty((n, 7))
    filled = 0
    while filled < n:
        need = n - filled
        m = need + need // 50 + 16
        lab = np.minimum(np.searchsorted(cum, rng.random(m) * cum[-1], side="right"), len(cum) - 1)
        z = rng.standard_normal((m, 7))
        v = np.empty((m, 7))
        for k in range(len(cum)):
            sel = lab == k
            v[sel] = model.means[k] + z[sel] @ L[k].T
        ok = (v[:, 0] >= DELTA) & (v[:, 0] <= 360.0 - DELTA) & (np.abs(v[:, 1]) <= 90.0 - DELTA)
        v = v[ok][:need]
        out[filled : filled + len(v)] = v
        filled += len(v)
    return out

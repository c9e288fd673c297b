"""Per-row posteriors on real Gaia rows against an independent information-form computation.

The 71 real rows of tests/data (see PROVENANCE.md; 53 with all five astrometric fields, 18
two-parameter solutions), astrometric fields only (ra, dec [deg], parallax [mas], pmra, pmdec
[mas/yr]; noise from the archive's errors and correlations), and a 4-component model
constructed from the rows at their own scales (ra/dec spread ~100 deg, noise 1e-17..1e-13 deg^2).
This is the regime where V - V T^-1 V cancels: the textbook formulas are asserted to fail here,
so these tests can tell a cancelling posterior from an exact one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.posterior_refs import info_form_posterior, textbook_posterior
from xd_dask.io import read_partition
from xd_dask.kernels import posterior
from xd_dask.params import Params

DATA = Path(__file__).parent / "data"
SAMPLES = [
    "gaia_dr3_cone_sample.parquet",
    "gaia_edr3_allsky_sample.parquet",
    "gaia_dr3_allsky_sample.parquet",
]
ASTRO = 5  # ra, dec, parallax, pmra, pmdec: the first five features of the gaia_dr3 schema


@pytest.fixture(scope="module")
def gaia():
    blocks = [read_partition(DATA / name, "gaia_dr3") for name in SAMPLES]
    X = np.concatenate([b.X for b in blocks])[:, :ASTRO]
    S = np.concatenate([b.X_cov for b in blocks])[:, :ASTRO, :ASTRO]
    complete = ~np.isnan(X).any(axis=1)
    two_param = np.isnan(X[:, 2:]).all(axis=1) & ~np.isnan(X[:, :2]).any(axis=1)
    assert complete.sum() >= 40 and two_param.sum() >= 10  # both kinds of rows are tested
    # A model at the rows' own scales: the complete rows' mean and covariance, shifted and
    # rescaled per component (narrow in parallax and proper motion for one of them).
    mu = X[complete].mean(axis=0)
    cov = np.cov(X[complete], rowvar=False)
    sd = np.sqrt(np.diag(cov))
    shifts = np.array([[0, 0, 0, 0, 0], [0.5, -0.3, 1.0, 0.5, -0.5], [-0.8, 0.6, -0.5, 1.5, 0.2]])
    shifts = np.vstack([shifts, [0.2, 0.2, 0.3, -0.3, 0.3]])
    scales = np.array([[1, 1, 1, 1, 1], [0.6, 0.8, 0.5, 0.7, 0.7], [1.2, 0.5, 2, 1.5, 1]])
    scales = np.vstack([scales, [0.3, 0.3, 0.05, 0.1, 0.1]])
    means = mu + shifts * sd
    covs = np.stack([cov * np.outer(s, s) for s in scales])
    weights = np.array([0.4, 0.3, 0.2, 0.1])
    ref_mean, ref_cov, ref_resp = info_form_posterior(X, S, weights, means, covs)
    return X, S, weights, means, covs, (ref_mean, ref_cov, ref_resp), complete, two_param


def _errors(mean, cov, ref_mean, ref_cov, x):
    """Covariance error in correlation units; mean error in posterior sd, beyond 2 ulp of the
    value (an ra of 300 deg is only resolved to 6e-14 deg, ~1e-5 of a bright star's sd)."""
    sd = np.sqrt(np.diagonal(ref_cov, axis1=1, axis2=2))
    cov_err = np.abs(cov - ref_cov) / (sd[:, :, None] * sd[:, None, :])
    slack = 2 * np.spacing(np.abs(np.where(np.isnan(x), ref_mean, x)))
    mean_err = np.maximum(np.abs(mean - ref_mean) - slack, 0.0) / sd
    return cov_err.max(axis=(1, 2)), mean_err.max(axis=1)


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_posterior_equals_information_form_on_real_gaia_rows(gaia, backend):
    X, S, w, m, V, (ref_mean, ref_cov, ref_resp), complete, two_param = gaia
    post = posterior(X, S, Params(w, m, V), backend=backend, summary=True, return_resp=True)
    var = np.diagonal(post.cov, axis1=1, axis2=2)
    assert np.all(var > 0), f"{(var <= 0).sum()} non-positive posterior variances"
    cov_err, mean_err = _errors(post.mean, post.cov, ref_mean, ref_cov, X)
    for rows, what in ((complete, "complete"), (two_param, "2-parameter")):
        assert cov_err[rows].max() <= 1e-6, f"{what} rows: covariance error {cov_err[rows].max()}"
        assert mean_err[rows].max() <= 1e-6, f"{what} rows: mean error {mean_err[rows].max()} sd"
    np.testing.assert_allclose(post.resp, ref_resp, rtol=1e-9, atol=1e-12)
    assert np.array_equal(post.map_component, np.argmax(ref_resp, axis=1))
    # The rows' ra variance is ~1e-17 deg^2 against a prior of ~1e4 deg^2.
    assert np.median(var[complete, 0] / V[:, 0, 0].max()) < 1e-18


def test_textbook_formulas_fail_on_these_rows(gaia):
    """b = m + V T^-1 w, B = V - V T^-1 V (float64) on the same rows: far off, often negative."""
    X, S, w, m, V, (ref_mean, ref_cov, _), complete, _ = gaia
    mean, cov = textbook_posterior(X, S, w, m, V)
    cov_err, _ = _errors(mean, cov, ref_mean, ref_cov, X)
    assert np.median(cov_err[complete]) > 1e-2
    assert (np.diagonal(cov, axis1=1, axis2=2) <= 0).any()


def test_float32_rows_give_posteriors_to_float32_input_precision(gaia):
    """Float32 rows (ra rounded to ~1e-5 deg) give float64 posteriors equal to the exact posterior
    of the rounded rows: the observed means are the float32 values minus a small correction."""
    X, S, w, m, V, _, complete, two_param = gaia
    X32, S32 = X.astype(np.float32), S.astype(np.float32)
    ref_mean, ref_cov, _ = info_form_posterior(X32, S32, w, m, V)
    mean, cov = posterior(X32, S32, Params(w, m, V), backend="numba")
    assert mean.dtype == cov.dtype == np.float64
    assert np.all(np.diagonal(cov, axis1=1, axis2=2) > 0)
    cov_err, mean_err = _errors(mean, cov, ref_mean, ref_cov, X32.astype(np.float64))
    assert cov_err.max() <= 1e-5 and mean_err.max() <= 1e-5, (cov_err.max(), mean_err.max())

"""Adam on the EM statistics and stratified waves in memory (no cluster): gradients against finite
differences of an independent likelihood, the update rule through the one loop, bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tests.mixtures import draw_noisy, known_mixture_3d, loop_stats
from xd_dask.distributed import FitConfig
from xd_dask.kernels import Background, compute_stats
from xd_dask.optim import ArrayStatistics, FitLoop, LoopSettings, OnlineEM
from xd_dask.optim.adam import (
    Adam,
    adam_schedule,
    component_scale,
    gradient,
    mixture_scale,
    params_from_theta,
    theta_from_params,
)
from xd_dask.optim.rules import StepData
from xd_dask.optim.strata import row_keys, stratum_of
from xd_dask.params import Params

# Gaia-like units: degrees, milliarcseconds, magnitudes - scales 1e2 .. 1e-2 apart
UNITS = np.array([100.0, 1.0, 0.01])


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    w, m, V = known_mixture_3d()
    X, S, _, _ = draw_noisy(rng, w, m, V, 300, noise_scale=0.5)
    X[rng.random(X.shape) < 0.1] = np.nan
    X[np.isnan(X).all(axis=1), 0] = 1.0
    X, S = X * UNITS + [180.0, 0.0, 1.0], S * np.outer(UNITS, UNITS)
    start = Params(
        np.array([0.4, 0.35, 0.25]),
        (m + [[0.5, -0.3, 0.2], [-0.4, 0.3, 0.6], [0.3, 0.5, -0.5]]) * UNITS + [180.0, 0.0, 1.0],
        1.3 * V * np.outer(UNITS, UNITS),
    )
    return X, S, start


def _mean_ll(X, S, p: Params) -> float:
    """Mean log-likelihood by the direct per-pair loop (tests/mixtures.py), or with a background
    by the kernel."""
    if p.background is None:
        return loop_stats(X, S, p.weights, p.means, p.covariances)[3] / X.shape[0]
    st = compute_stats(X, S, p)
    return st.ll / st.W


@pytest.mark.parametrize("scale_of", [component_scale, mixture_scale])
@pytest.mark.parametrize("background", [False, True])
def test_gradient_equals_finite_differences(data, background, scale_of):
    """With the components' own scales (K, D; the rule's) and one scale for the mixture (D,; an
    older checkpoint's rule state)."""
    X, S, start = data
    if background:
        box = Background(0.05, np.nanmin(X, axis=0) - 1.0, np.nanmax(X, axis=0) + 1.0)
        start = Params(0.95 * start.weights, start.means, start.covariances, box)
    scale = scale_of(start)
    theta = theta_from_params(start, scale)
    p = params_from_theta(theta, scale, start.background)
    np.testing.assert_allclose(p.covariances, start.covariances, rtol=1e-12, atol=1e-15)
    st = compute_stats(X, S, p)
    grad = gradient(st, theta, scale)
    h = 1e-5
    for block in ("z", "mu", "L"):
        fd = np.zeros_like(theta[block])
        for idx in np.ndindex(theta[block].shape):
            if block == "L" and idx[2] > idx[1]:
                continue  # the upper triangle is not a parameter
            up = {b: v.copy() for b, v in theta.items()}
            down = {b: v.copy() for b, v in theta.items()}
            up[block][idx] += h
            down[block][idx] -= h
            f_up = _mean_ll(X, S, params_from_theta(up, scale, start.background))
            f_down = _mean_ll(X, S, params_from_theta(down, scale, start.background))
            fd[idx] = (f_up - f_down) / (2 * h)
        err = np.linalg.norm(grad[block] - fd) / np.linalg.norm(fd)
        assert err < 1e-6, (block, err)
    if background:
        assert grad["z"].shape == (4,)  # the background's logit is a parameter too


def test_a_step_moves_each_component_by_a_fraction_of_its_own_spread(data):
    """Adam's first step moves every unconstrained parameter by the learning rate (m1 / sqrt(m2)
    = sign(g) after bias correction), so a mean moves by lr times its component's standard
    deviation in each feature: 1e-3 of the feature's unit for the narrow component, 10x its
    unit for the wide one (one scale for the mixture moved both by lr x the data's spread)."""
    X, S, _ = data
    sd = np.array([[1e-3, 1e-3, 1e-3], [10.0, 10.0, 10.0]]) * UNITS  # (K, D)
    means = np.nanmean(X, axis=0) + np.array([[0.0, 0.0, 0.0], [1.0, -1.0, 1.0]]) * UNITS
    start = Params(np.array([0.5, 0.5]), means, np.einsum("kd,de->kde", sd**2, np.eye(3)))
    rule, lr = Adam(0.05), 0.05
    state = rule.init(start)
    np.testing.assert_allclose(state["scale"], sd, rtol=1e-12)
    stats = compute_stats(X, S, start)
    _, upd = rule.step(state, StepData(stats, None, None, None), start, 0)
    moved = np.abs(upd.params.means - start.means)
    g = np.abs(np.asarray(stats.a)) > 0
    np.testing.assert_allclose(moved[g], (lr * sd)[g], rtol=1e-3)  # Adam's eps: |g| >> 1e-8


def test_adam_through_the_loop_climbs_and_keeps_its_state(data):
    X, S, start = data
    settings = LoopSettings(epochs=6, strata=5, seed=2, tol=0.0)
    loop = FitLoop(Adam(0.05, adam_schedule(30)), ArrayStatistics(X, S, seed=2), settings)
    state = loop.run(loop.start(start))
    waves, final = state.history[:-1], state.history[-1]
    assert final["final"] and final["mean_loglike"] == pytest.approx(_mean_ll(X, S, state.params))
    assert state.iteration == 30 and [h["stratum"][1] for h in waves] == [5] * 30
    assert sorted(h["stratum"][0] for h in waves[:5]) == [0, 1, 2, 3, 4]
    steps = [h["step"] for h in waves]
    assert steps[:15] == [0.05] * 15 and steps[-1] == pytest.approx(0.05 / 2**5)
    assert _mean_ll(X, S, state.params) > _mean_ll(X, S, start) + 0.05
    assert {"scale", "theta.z", "m1.L", "m2.mu"} <= set(state.rule_state)
    # the parameters are the state's theta: a checkpoint of the state resumes exactly
    p = params_from_theta(
        {b: state.rule_state[f"theta.{b}"] for b in ("z", "mu", "L")},
        state.rule_state["scale"],
        None,
    )
    np.testing.assert_array_equal(p.means, state.params.means)


def test_strata_cover_every_row_once_per_epoch_and_change_between_epochs():
    ids = np.arange(10_000, 30_000, dtype=np.int64)
    keys = row_keys(ids)
    e0, e1 = stratum_of(keys, 8, 5, 0), stratum_of(keys, 8, 5, 1)
    counts = np.bincount(e0, minlength=8)
    assert counts.sum() == ids.size and np.all(np.abs(counts - 2500) < 5 * 50)
    assert 0.1 < np.mean(e0 == e1) < 0.15  # new strata each epoch (1/8 agree by chance)
    # without ids the key of a row mixes its position with its unit
    assert not np.array_equal(row_keys(np.arange(5), unit=0), row_keys(np.arange(5), unit=1))


def test_online_em_on_strata_in_memory_reaches_batch_optimum(data):
    X, S, start = data
    settings = LoopSettings(epochs=20, strata=4, seed=1)
    loop = FitLoop(OnlineEM(), ArrayStatistics(X, S, seed=1), settings, log_level=logging.DEBUG)
    online = loop.run(loop.start(start)).params
    from xd_dask.estimator import XDGMM
    from xd_dask.model import XDModel

    batch = XDGMM(3, tol=1e-8, max_iter=500, init=XDModel(start)).fit(X, S)
    ll_batch = batch.score(X, S)
    assert abs(_mean_ll(X, S, online) - ll_batch) < 0.01 * abs(ll_batch)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("learning_rate", 0.0, "fit.learning_rate must be > 0 \\(number in \\(0, 1\\]\\), got 0"),
        ("learning_rate", 2.0, "fit.learning_rate must be <= 1 \\(number in \\(0, 1\\]\\), got 2"),
        ("step", {"kind": "power", "kappa": 0.3}, "fit.step.kappa must be > 0.5"),
        ("step", {"kind": "halving", "lambda0": 1.5}, "fit.step.lambda0 must be <= 1"),
        ("waves", "random", "waves must be one of"),
        ("waves_per_epoch", -1, "fit.waves_per_epoch must be >= 0"),
        ("method", "sgd", "method must be one of"),
    ],
)
def test_out_of_range_settings_are_refused_naming_the_key(field, value, match):
    with pytest.raises(ValueError, match=match):
        FitConfig(catalog="x", n_components=2, **{field: value})
    with pytest.raises(ValueError, match="learning_rate"):
        Adam(-1.0)


def test_job_config_checks_the_new_keys():
    from xd_dask.jobs.config import ConfigError, load_config

    cfg = load_config(None, {"fit.method": "adam", "fit.waves": "strata", "fit.learning_rate": 0.1})
    assert cfg.get("fit.waves_per_epoch") == 0
    for key, bad in (("fit.learning_rate", 1.5), ("fit.waves", "rows"), ("fit.step.kappa", 2.0)):
        with pytest.raises(ConfigError, match=key.replace(".", "\\.")):
            load_config(None, {key: bad})


def test_adam_fits_the_background_weight(data):
    """With a background component its logit is a parameter: three absurd rows among 300 raise
    its weight from 0.1 % towards their share (1 %), and the Gaussians stay in the bulk."""
    X, S, start = data
    far = np.array([[1e4, 50.0, 5.0], [-1e4, -50.0, -5.0], [2e4, 0.0, 3.0]])
    Xa, Sa = np.vstack([X, far]), np.vstack([S, S[:3]])
    box = Background(1e-3, np.array([-3e4, -100.0, -10.0]), np.array([3e4, 100.0, 10.0]))
    start = Params(start.weights * (1 - 1e-3), start.means, start.covariances, box)
    settings = LoopSettings(epochs=40, strata=2, seed=0)
    loop = FitLoop(Adam(0.1, adam_schedule(80)), ArrayStatistics(Xa, Sa), settings)
    fitted = loop.run(loop.start(start)).params
    assert 0.008 < fitted.background.weight < 0.013  # 3 / 303 = 0.0099
    assert fitted.weights.sum() == pytest.approx(1 - fitted.background.weight, abs=1e-12)
    assert np.all(np.abs(fitted.means[:, 0] - 180.0) < 2000.0)  # no component chases them

"""Split-and-merge EM (xd_dask.optim.splitmerge): criteria against a direct per-row loop, the
moves' moments, escape from a known local maximum in memory and on a real cluster, resume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from tests.distributed_data import FEATURES, rows_as_written, schema, write_catalog
from tests.mixtures import draw_noisy
from xd_dask.distributed import FitConfig, fit_catalog, load_checkpoint, resume_fit
from xd_dask.estimator import XDGMM
from xd_dask.kernels import row_log_likelihood
from xd_dask.model import XDModel
from xd_dask.optim import FitLoop, LoopSettings, OnlineEM
from xd_dask.optim.adam import Adam
from xd_dask.optim.arrays import ArrayStatistics
from xd_dask.optim.loop import ConvergenceWarning
from xd_dask.optim.splitmerge import (
    SplitMerge,
    WaveSplitMerge,
    array_criteria,
    merge_criterion,
    move_stats,
    propose,
    rank_candidates,
    split_criterion,
    split_score,
)
from xd_dask.params import Params

# the generating mixture: two components side by side, a third far above them
W_TRUE = np.full(3, 1 / 3)
M_TRUE = np.array([[-4.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 12.0, 0.0]])
V_TRUE = np.stack([np.eye(3)] * 3)
# the stuck start: component 0 covers true 0 and 1, components 1 and 2 share true 2
START = XDModel(
    Params(
        np.array([2 / 3, 1 / 6, 1 / 6]),
        np.array([[0.0, 0.0, 0.0], [-0.6, 12.0, 0.0], [0.6, 12.0, 0.0]]),
        np.stack([np.diag([17.0, 1.0, 1.0]), 0.6 * np.eye(3), 0.6 * np.eye(3)]),
    ),
    FEATURES,
)
N = 3000
TOL = 1e-4


@pytest.fixture(scope="module")
def rows():
    X, S, _, _ = draw_noisy(np.random.default_rng(5), W_TRUE, M_TRUE, V_TRUE, N, noise_scale=0.3)
    return X, S


def _mean_ll(X, S, w, m, V) -> float:
    return float(np.mean(row_log_likelihood(X, S, Params(w, m, V), backend="reference")))


def test_criteria_equal_a_direct_loop_over_rows():
    rng = np.random.default_rng(1)
    X, S, _, _ = draw_noisy(rng, W_TRUE, M_TRUE, V_TRUE, 150, noise_scale=0.5)
    X[3, 1] = np.nan  # a missing field: the row's density is over its observed fields
    rw = rng.uniform(0.5, 2.0, size=150)
    p = Params(START.weights, START.means, START.covariances)
    ms = move_stats(X, S, p, row_weights=rw, backend="reference")
    K = 3
    dens = np.zeros((150, K))
    for i in range(150):
        o = ~np.isnan(X[i])
        for j in range(K):
            T = START.covariances[j][np.ix_(o, o)] + S[i][np.ix_(o, o)]
            dens[i, j] = multivariate_normal(START.means[j][o], T).pdf(X[i][o])
    r = START.weights * dens / (START.weights * dens).sum(axis=1, keepdims=True)
    RR = np.einsum("i,ij,ik->jk", rw, r, r)
    n = (rw[:, None] * r).sum(axis=0)
    f = rw[:, None] * r / n
    J_split = np.sum(f * np.log(f / dens), axis=0)
    np.testing.assert_allclose(ms.RR, RR, rtol=1e-10)
    np.testing.assert_allclose(split_criterion(ms), J_split, rtol=1e-9)
    Jm = merge_criterion(ms)
    assert Jm[1, 2] == pytest.approx(RR[1, 2] / np.sqrt(RR[1, 1] * RR[2, 2]), rel=1e-12)
    # the two components that share a cluster merge; the one covering two clusters splits
    ranked = rank_candidates(ms, 5)
    assert ranked[0] == (1, 2, 0) and len(ranked) == 3  # K = 3: one split per merge pair
    # the split score's sums: each row's standardised coordinate along the principal axis of
    # V_j, on its observed fields (a per-row loop)
    y = np.zeros((150, K))
    for j in range(K):
        e = np.linalg.eigh(START.covariances[j])[1][:, -1]
        for i in range(150):
            o = ~np.isnan(X[i])
            T = START.covariances[j][np.ix_(o, o)] + S[i][np.ix_(o, o)]
            y[i, j] = e[o] @ (X[i][o] - START.means[j][o]) / np.sqrt(e[o] @ T @ e[o])
    wr = rw[:, None] * r
    for p_ in range(4):
        np.testing.assert_allclose(ms.ax[:, p_], np.sum(wr * y ** (p_ + 1), axis=0), rtol=1e-9)
    mu, var = ms.ax[:, 0] / n, ms.ax[:, 1] / n - (ms.ax[:, 0] / n) ** 2
    z = (y - mu) / np.sqrt(var)
    skew, kurt = (wr * z**3).sum(0) / n, (wr * z**4).sum(0) / n - 3
    np.testing.assert_allclose(split_score(ms), n * (skew**2 / 12 + kurt**2 / 48), rtol=1e-8)


def _trap(sep: float, seed: int, n: int):
    """A known 8-component mixture in D = 4 (unit clumps 10 apart on a grid) where components
    0 and 1 are ``sep`` apart, and a start that puts 0 and 1 under one component and doubles
    the clump of 2 (what k-means gives when seeded there)."""
    rng = np.random.default_rng(seed)
    D, K = 4, 8
    m = np.zeros((K, D))
    m[:, :2] = np.array([[i, j] for i in range(3) for j in range(3)])[:K] * 10.0
    m[1] = m[0] + [sep, 0, 0, 0]
    w, V = np.full(K, 1 / K), np.stack([np.eye(D)] * K)
    v = m[rng.choice(K, n, p=w)] + rng.normal(size=(n, D))
    S = np.broadcast_to(0.25 * np.eye(D), (n, D, D)).copy()
    X = v + rng.normal(size=(n, D)) * 0.5
    m0, V0, w0 = m.copy(), V.copy(), w.copy()
    m0[0], V0[0] = 0.5 * (m[0] + m[1]), np.diag([1 + (sep / 2) ** 2, 1, 1, 1])
    m0[1], m0[2] = m[2] + [0.3, 0.3, 0, 0], m[2] - [0.3, 0.3, 0, 0]
    w0[0], w0[1], w0[2] = 2 / K, 0.5 / K, 0.5 / K
    return X, S, XDModel(Params(w, m, V)), XDModel(Params(w0 / w0.sum(), m0, V0))


@pytest.mark.parametrize("sep", [3.0, 12.0])
def test_split_and_merge_leaves_both_traps_at_its_defaults(sep):
    """The overlapping pair (3 sigma) and the far pair (12 units) under one component, another
    clump doubled: at the defaults split-and-merge ends where a fit started from the generating
    mixture ends (on held-out rows), and its first move merges the doubled clump and splits the
    pair's component. The former KL ranking (-log n_j: the heavy pair component ranked last)
    never tried it for the overlapping pair and ended 0.010 nats/row lower."""
    X, S, truth, start = _trap(sep, 0, 16_000)
    Xh, Sh, _, _ = _trap(sep, 1, 8_000)
    ideal = XDGMM(8, init=truth, tol=1e-6, max_iter=500).fit(X, S)
    sm = XDGMM(8, init=start, tol=1e-6, max_iter=500, split_merge=True).fit(X, S)
    gap = sm.model_.log_density(Xh, Sh) - ideal.model_.log_density(Xh, Sh)
    assert gap.mean() > -2 * gap.std() / np.sqrt(len(gap)) - 1e-4, gap.mean()
    first = sm.moves_[0]
    assert sorted(first["merge"]) == [1, 2] and first["accepted"], sm.moves_
    if sep == 3.0:
        assert first["split"] == 0


def test_move_keeps_the_weights_and_the_moments():
    p = Params(START.weights, START.means, START.covariances)
    q = propose(p, (1, 2, 0))
    assert q.weights.sum() == pytest.approx(1.0, abs=1e-15)
    assert q.weights[1] == q.weights[2] == pytest.approx(1 / 3)

    def moments(w, m, V):
        mean = (w[:, None] * m).sum(0) / w.sum()
        d = m - mean
        return mean, (w[:, None, None] * (V + d[:, :, None] * d[:, None, :])).sum(0) / w.sum()

    for before, after in (([1, 2], [1]), ([0], [2, 0])):  # merged at j, halves at k and l
        for a, b in zip(
            moments(p.weights[before], p.means[before], p.covariances[before]),
            moments(q.weights[after], q.means[after], q.covariances[after]),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, atol=1e-12)
    # the split is along the principal axis: sqrt(17)/2 either side of the old mean
    np.testing.assert_allclose(np.abs(q.means[[0, 2], 0]), np.sqrt(17) / 2, rtol=1e-12)


def test_split_and_merge_escapes_the_local_maximum(rows):
    X, S = rows
    ll_true = _mean_ll(X, S, W_TRUE, M_TRUE, V_TRUE)
    plain = XDGMM(3, init=START, tol=TOL, max_iter=300).fit(X, S)
    sm = XDGMM(3, init=START, tol=TOL, max_iter=300, split_merge=True).fit(X, S)
    ll_plain = _mean_ll(X, S, plain.weights_, plain.means_, plain.covariances_)
    ll_sm = _mean_ll(X, S, sm.weights_, sm.means_, sm.covariances_)
    assert abs(ll_sm - ll_true) < 1 / np.sqrt(N)
    assert ll_plain < ll_true - 10 / np.sqrt(N)  # stuck: ~0.42 nats per row below
    assert sm.lower_bound_ == pytest.approx(ll_sm, abs=1e-12)  # the last pass scores the result
    order = np.argsort(sm.means_[:, 1] * 100 + sm.means_[:, 0])
    np.testing.assert_allclose(sm.means_[order], M_TRUE, atol=0.15)
    accepted = [mv for mv in sm.moves_ if mv["accepted"]]
    assert [(mv["merge"], mv["split"]) for mv in accepted] == [([1, 2], 0)]
    assert len(sm.moves_) == 1 + 5 - 2  # then the other candidates (K = 3 has 3) are rejected
    for mv in sm.moves_:
        assert (mv["ll_after"] > mv["ll_before"]) == mv["accepted"]
    # EM between moves never lowers the log-likelihood (partial EM included), and the
    # log-likelihood at each convergence (after each accepted move) never decreases
    hist = sm.history_
    for a, b in zip(hist, hist[1:], strict=False):
        if not a["moved"]:
            assert b["mean_loglike"] >= a["mean_loglike"] - 1e-12
    settled = [mv["ll_before"] for mv in sm.moves_]
    assert all(b >= a for a, b in zip(settled, settled[1:], strict=False))


def test_moves_need_full_batch_em(rows):
    X, S = rows
    with pytest.raises(ValueError, match="are not WaveMoves"):
        FitLoop(
            OnlineEM(),
            ArrayStatistics(X, S),
            LoopSettings(wave_size=1),
            moves=SplitMerge(lambda p: None),
        )


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, rows):
    """The rows as 3 Parquet files (ids 1000, 1001, ...) and the stuck start as a model file."""
    root = tmp_path_factory.mktemp("sm")
    write_catalog(root / "cat", *rows, 3)
    START.save(root / "start.npz")
    return str(root / "cat"), str(root / "start.npz")


@pytest.mark.cluster
def test_cluster_equals_in_memory_and_resumes_mid_move(client, rows, catalogue, tmp_path):
    X, S = rows
    cat, start = catalogue

    def config(ck):
        return FitConfig(
            catalog=cat,
            n_components=3,
            schema=schema(),
            init=start,
            max_iter=300,
            tol=TOL,
            split_merge=True,
            split_merge_candidates=1,
            checkpoint_dir=str(ck),
        )

    model = fit_catalog(config(tmp_path / "ref"), client)
    Xw, Sw = rows_as_written(X, S)
    ref = XDGMM(3, init=START, tol=TOL, max_iter=300, split_merge=True, split_merge_candidates=1)
    ref.fit(Xw, Sw)
    for a, b in (
        (model.weights, ref.weights_),
        (model.means, ref.means_),
        (model.covariances, ref.covariances_),
    ):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-8)
    hist = model.metadata["history"]
    assert [h["split_merge"] for h in hist] == [h["split_merge"] for h in ref.history_]
    assert model.metadata["final_mean_loglike"] == pytest.approx(ref.lower_bound_, abs=1e-10)

    class Interrupt(Exception):
        pass

    partial_seen = []

    def stop_in_partial_em(event):
        if event.get("split_merge") == "partial":
            partial_seen.append(event["iteration"])
            if len(partial_seen) == 2:
                raise Interrupt

    ck = tmp_path / "ck"
    with pytest.raises(Interrupt):
        fit_catalog(config(ck), client, stop_in_partial_em)
    state = load_checkpoint(ck)[0]
    assert state.info["split_merge"]["phase"] == "partial" and not state.finished
    shutil.rmtree(tmp_path / "ref")
    resumed = resume_fit(ck, client)
    assert [h["mean_loglike"] for h in resumed.metadata["history"]] == [
        h["mean_loglike"] for h in hist
    ]  # bit for bit
    np.testing.assert_array_equal(resumed.covariances, model.covariances)


def _wave_fit(rule, X, S, moves: bool, tol: float = TOL, ids=None):
    """Online EM / Adam from the stuck start on 4 hash strata per epoch, 6 epochs."""
    src = ArrayStatistics(X, S, ids=ids)
    sm = WaveSplitMerge(array_criteria(src), every=4, tol=tol) if moves else None
    loop = FitLoop(rule, src, LoopSettings(epochs=6, strata=4, seed=0, tol=0.0), moves=sm)
    return loop.run(loop.start(Params(START.weights, START.means, START.covariances)))


@pytest.mark.parametrize("rule", ["online", "adam"])
def test_stochastic_split_and_merge_on_waves_escapes(rows, rule):
    X, S = rows
    ll_true = _mean_ll(X, S, W_TRUE, M_TRUE, V_TRUE)

    def make():
        return OnlineEM() if rule == "online" else Adam(0.05)

    plain = _wave_fit(make(), X, S, moves=False).params
    st = _wave_fit(make(), X, S, moves=True)
    ll_plain = _mean_ll(X, S, plain.weights, plain.means, plain.covariances)
    p = st.params
    ll_sm = _mean_ll(X, S, p.weights, p.means, p.covariances)
    assert ll_plain < ll_true - 10 / np.sqrt(N)
    # online EM lands within 1/sqrt(N) of the generating mixture; Adam's steps are noisier
    assert abs(ll_sm - ll_true) < (1 if rule == "online" else 2) / np.sqrt(N)
    moves = st.info["split_merge"]["moves"]
    assert [(mv["merge"], mv["split"]) for mv in moves if mv["accepted"]] == [([1, 2], 0)]
    assert moves[0]["iteration"] == 4 + 2 + 1  # moved at wave 4, judged after 2 trial waves
    for mv in moves:  # judged on the same wave's rows, before and after
        assert (mv["ll_after"] - mv["ll_before"] > TOL) == mv["accepted"]
    waves = [h for h in st.history if not h.get("final")]
    assert len(waves) == 24 and st.history[-1]["final"]  # the moves cost passes, not waves


@pytest.mark.cluster
def test_cluster_online_split_and_merge_equals_in_memory(client, rows, catalogue):
    cat, start = catalogue
    cfg = FitConfig(
        catalog=cat,
        n_components=3,
        schema=schema(),
        init=start,
        method="online",
        epochs=6,
        waves="strata",
        waves_per_epoch=4,
        tol=TOL,
        split_merge=True,
    )
    # 6 epochs with moves tried in each (their trial waves count in the epoch means) do not
    # settle: the fit says so
    with pytest.warns(ConvergenceWarning, match="in 6 epochs"):
        model = fit_catalog(cfg, client)
    assert model.metadata["waves"]["mode"] == "strata"
    Xw, Sw = rows_as_written(*rows)
    ref = _wave_fit(OnlineEM(), Xw, Sw, moves=True, ids=np.arange(1000, 1000 + N)).params
    np.testing.assert_allclose(model.weights, ref.weights, rtol=0, atol=1e-9)
    np.testing.assert_allclose(model.means, ref.means, rtol=0, atol=1e-8)
    np.testing.assert_allclose(model.covariances, ref.covariances, rtol=1e-8, atol=1e-9)
    hist = model.metadata["history"]
    assert [h.get("split_merge") for h in hist].count("moved") == 3  # as in memory: 3 moves tried

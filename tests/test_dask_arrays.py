"""XD on dask arrays (issue 21.5): DaskXDGMM runs the one fitting loop on statistics computed one
task per chunk and tree-reduced on a real two-process cluster; from the same start it equals the
in-memory XDGMM on the same rows, for batch EM, online EM and Adam (the waves are the same hash
strata of the rows)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from tests.distributed_data import make_rows
from xd_dask.distributed import DaskXDGMM
from xd_dask.estimator import XDGMM
from xd_dask.model import XDModel

pytestmark = pytest.mark.cluster

N, CHUNK = 2400, 700  # 4 chunks, the last shorter


@pytest.fixture(scope="module")
def rows():
    """Noisy rows of the known 3-d mixture, 10 % of the fields missing, and a start model."""
    X, S = make_rows(11, N, missing=0.1)
    start = XDGMM(3, max_iter=2, tol=0.0, random_state=1).fit(X, S).model_
    return X, S, XDModel(start.params)


def _dask(X, S, w=None):
    dw = None if w is None else da.from_array(w, chunks=CHUNK)
    return da.from_array(X, chunks=(CHUNK, 3)), da.from_array(S, chunks=(CHUNK, 3, 3)), dw


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("em", {"max_iter": 6, "tol": 0.0}),
        ("online", {"epochs": 2, "waves_per_epoch": 4, "tol": 0.0}),
        ("adam", {"epochs": 2, "waves_per_epoch": 4, "tol": 0.0, "learning_rate": 0.05}),
    ],
)
def test_equals_the_in_memory_fit(client, rows, method, settings):
    X, S, start = rows
    w = np.random.default_rng(2).uniform(0.5, 1.5, size=N)
    kw = {"method": method, "init": start, "random_state": 4, **settings}
    ref = XDGMM(3, **kw).fit(X, S, weights=w)
    got = DaskXDGMM(3, **kw).fit(*_dask(X, S, w), client=client)
    np.testing.assert_allclose(got.weights_, ref.weights_, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(got.means_, ref.means_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got.covariances_, ref.covariances_, rtol=1e-8, atol=1e-10)
    key = "mean_loglike" if method == "em" else "wave_mean_loglike"
    steps = [h for h in ref.history_ if key in h]
    assert len(steps) == len([h for h in got.history_ if key in h]) >= 4
    np.testing.assert_allclose(
        [h[key] for h in got.history_ if key in h], [h[key] for h in steps], rtol=1e-10
    )
    assert got.lower_bound_ == pytest.approx(ref.lower_bound_, rel=1e-10)
    assert got.n_iter_ == ref.n_iter_


def test_one_task_per_chunk_tree_reduced(client, rows):
    """Each EM iteration: one xd-array-estep task per chunk (4) and a reduction of them."""
    from distributed import get_task_stream

    X, S, start = rows
    with get_task_stream(client) as ts:
        DaskXDGMM(3, init=start, max_iter=3, tol=0.0).fit(*_dask(X, S)[:2], client=client)
    names = [t["key"][0] if isinstance(t["key"], tuple) else t["key"] for t in ts.data]
    estep = [n for n in names if n.startswith("xd-array-estep-")]
    assert len(estep) == 3 * 4
    assert any(n.startswith("xd-array-reduce-") for n in names)


def test_the_kmeans_start_of_one_chunk_is_the_in_memory_one(client, rows):
    """One chunk is one unit, as in memory: the default start (k-means) and the fit are equal;
    scores and responsibilities come back as dask arrays equal to the in-memory ones."""
    X, S, _ = rows
    ref = XDGMM(3, max_iter=4, tol=0.0, random_state=3).fit(X, S)
    dX, dS = da.from_array(X, chunks=(N, 3)), da.from_array(S, chunks=(N, 3, 3))
    got = DaskXDGMM(3, max_iter=4, tol=0.0, random_state=3).fit(dX, dS, client=client)
    np.testing.assert_allclose(got.means_, ref.means_, rtol=1e-8, atol=1e-10)
    many = _dask(X, S)[:2]
    ll = got.score_samples(*many)
    assert isinstance(ll, da.Array) and ll.chunks[0] == many[0].chunks[0]
    np.testing.assert_allclose(ll.compute(), ref.score_samples(X, S), rtol=1e-10)
    assert got.score(*many) == pytest.approx(ref.score(X, S), rel=1e-10)
    np.testing.assert_array_equal(got.predict(*many).compute(), ref.predict(X, S))
    # the workers ran those tasks without importing scikit-learn (the estimator's base class;
    # the probe is a builtin: a function of this module would import it, and so scikit-learn)
    probe = "'sklearn' in __import__('sys').modules"
    assert set(client.run(eval, probe).values()) == {False}


def test_a_background_component_and_bad_input(client, rows):
    X, S, _ = rows
    xd = DaskXDGMM(3, max_iter=3, tol=0.0, background=True, random_state=0)
    xd.fit(*_dask(X, S)[:2], client=client)
    assert xd.background_ is not None and 0 < xd.background_.weight < 0.5
    with pytest.raises(ValueError, match=r"X must be \(n, D\) and X_cov \(n, D, D\)"):
        DaskXDGMM(2).fit(da.from_array(X), da.from_array(S[:, :2, :2]), client=client)
    with pytest.raises(ValueError, match="split_merge"):
        DaskXDGMM(2, split_merge=True).fit(*_dask(X, S)[:2], client=client)

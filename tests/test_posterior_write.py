"""The workers' posterior writer: the chosen column groups, top-k, the background column,
float32 rows; values against the in-memory kernels (no cluster: the task is a plain function;
the cluster path is tested in test_distributed_fit and test_cli_end_to_end)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.mixtures import draw_noisy, random_params
from xd_dask.distributed.apply_tasks import PosteriorRequest, posterior_write
from xd_dask.distributed.tasks import Block, TaskOptions
from xd_dask.io import plain_schema
from xd_dask.io.writers import part_path
from xd_dask.kernels import Background, posterior
from xd_dask.params import Params

NAMES = ["a", "b", "c"]
SCHEMA = plain_schema(NAMES, [f"e_{f}" for f in NAMES], id_column="source_id")


@pytest.fixture
def block():
    rng = np.random.default_rng(21)
    w, m, V = random_params(rng, 4, 3)
    X, S, _, _ = draw_noisy(rng, w, m, V, 50)
    X[:10, 1:] = np.nan
    blk = Block(0, "part-0.parquet", X, S, np.arange(1000, 1050, dtype=np.int64), 50, {})
    return blk, Params(w, m, V)


def _write(tmp_path, blk, params, columns=("mean", "cov", "map"), top_k=0, dtype="float64"):
    req = PosteriorRequest(str(tmp_path), tuple(NAMES), tuple(columns), top_k)
    part = posterior_write(blk, TaskOptions(schema=SCHEMA, dtype=dtype), params, req)
    assert part.n_used == blk.n_rows
    out = part_path(tmp_path, "posterior", blk.pid)
    assert part.files == {out: blk.n_rows}
    return pq.read_table(out)


def test_default_columns_match_the_kernel(tmp_path, block):
    blk, p = block
    t = _write(tmp_path, blk, p).to_pydict()
    tri = [f"cov_{f}_{NAMES[j]}" for i, f in enumerate(NAMES) for j in range(i + 1)]
    assert list(t) == [
        "source_id",
        "mean_a",
        "mean_b",
        "mean_c",
        *tri,
        "component",
        "component_prob",
        "status",
    ]
    want = posterior(blk.X, blk.X_cov, p, summary=True)
    np.testing.assert_array_equal(t["source_id"], blk.ids)
    np.testing.assert_array_equal(t["mean_b"], want.mean[:, 1])
    np.testing.assert_array_equal(t["cov_c_a"], want.cov[:, 2, 0])
    np.testing.assert_array_equal(t["component"], want.map_component)
    np.testing.assert_array_equal(t["component_prob"], want.map_resp)


def test_chosen_groups_top_k_and_background(tmp_path, block):
    blk, p = block
    bg = Background(0.05, [-30.0] * 3, [30.0] * 3)
    p = Params(p.weights * 0.95, p.means, p.covariances, bg)
    t = _write(tmp_path, blk, p, columns=("mean", "resp"), top_k=2).to_pydict()
    assert not any(c.startswith("cov_") for c in t) and "component" not in t
    want = posterior(blk.X, blk.X_cov, p, top_k=2, summary=True, return_resp=True)
    resp = np.column_stack([t[f"resp_{j}"] for j in range(4)])
    np.testing.assert_array_equal(resp, want.resp)
    np.testing.assert_allclose(resp.sum(axis=1) + t["background_resp"], 1.0, rtol=1e-12)
    for k in range(2):
        np.testing.assert_array_equal(t[f"top{k}_component"], want.top_component[:, k])
        np.testing.assert_array_equal(t[f"top{k}_resp"], want.top_resp[:, k])
        np.testing.assert_array_equal(t[f"top{k}_mean_c"], want.top_mean[:, k, 2])
        np.testing.assert_array_equal(t[f"top{k}_cov_b_a"], want.top_cov[:, k, 1, 0])
    with pytest.raises(ValueError, match="unknown posterior column group"):
        _write(tmp_path, blk, p, columns=("mean", "median"))


def test_float32_rows_give_float64_columns(tmp_path, block):
    blk, p = block
    blk32 = Block(
        0, blk.path, blk.X.astype(np.float32), blk.X_cov.astype(np.float32), blk.ids, 50, {}
    )
    tab = _write(tmp_path, blk32, p, dtype="float32")
    assert tab.schema.field("mean_a").type == "double"
    want_mean, want_cov = posterior(
        blk32.X.astype(np.float64),
        blk32.X_cov.astype(np.float64),
        p,
    )
    np.testing.assert_allclose(tab["mean_a"].to_numpy(), want_mean[:, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tab["cov_b_b"].to_numpy(), want_cov[:, 1, 1], rtol=1e-4)


def test_cli_posterior_flags_on_real_rows(tmp_path):
    """`xd-dask posterior --columns mean,map --top-k 2` on real Gaia rows (a one-worker local
    cluster): the columns asked for, equal to the in-memory posterior of the model."""
    from click.testing import CliRunner

    from tests.test_posterior_gaia import DATA
    from xd_dask.cli import main
    from xd_dask.io import load_schema, read_partition
    from xd_dask.model import XDModel

    path = DATA / "gaia_dr3_allsky_sample.parquet"
    blk = read_partition(path, "gaia_dr3")
    X, S = blk.X, blk.X_cov
    mu, sd = np.nanmean(X, axis=0), np.nanstd(X, axis=0)
    model = XDModel(
        Params([0.6, 0.4], [mu, mu + 0.5 * sd], [np.diag(sd**2), np.diag((0.5 * sd) ** 2)]),
        feature_names=load_schema("gaia_dr3").features,
    )
    model.save(tmp_path / "model.npz")
    args = ["posterior", str(tmp_path / "model.npz"), str(path), str(tmp_path / "post")]
    args += ["--columns", "mean,map", "--top-k", "2", "--n-workers", "1"]
    res = CliRunner().invoke(main, [*args, "--threads-per-worker", "1"])
    assert res.exit_code == 0, res.output
    t = pq.read_table(sorted((tmp_path / "post").glob("*.parquet"))).to_pydict()
    assert not any(c.startswith("cov_") for c in t) and "top1_cov_dec_ra" in t
    want = model.posterior(X, S, summary=True, top_k=2)
    order = np.argsort(t["source_id"])
    assert np.array_equal(np.asarray(t["source_id"])[order], np.sort(blk.ids))
    rows = np.argsort(blk.ids)
    np.testing.assert_allclose(np.asarray(t["mean_ra"])[order], want.mean[rows, 0], rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(t["component"])[order], want.map_component[rows])
    np.testing.assert_allclose(
        np.asarray(t["top1_cov_dec_ra"])[order], want.top_cov[rows, 1, 1, 0], rtol=1e-9
    )

"""Model selection (`xd-dask select`, xd_dask.jobs.select): parameter count and BIC against
scikit-learn, bad -k, and K chosen on a generated K_true = 6 mixture through the CLI on a real
cluster."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tomli_w
import tomllib
from click.testing import CliRunner
from sklearn.mixture import GaussianMixture

from tests.distributed_data import FEATURES, schema, write_catalog
from tests.mixtures import draw_noisy, random_spd
from xd_dask.cli import main
from xd_dask.jobs.select import bic, n_parameters, parse_ks
from xd_dask.model import XDModel

K_TRUE = 6


def test_parameter_count_and_bic_equal_scikit_learn():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3)) + rng.integers(0, 3, size=(400, 1)) * 5.0
    for K, D in ((1, 3), (4, 3), (3, 2)):
        gm = GaussianMixture(K, covariance_type="full", random_state=0).fit(X[:, :D])
        assert n_parameters(K, D) == gm._n_parameters()
        total = gm.score(X[:, :D]) * X.shape[0]
        assert bic(total, n_parameters(K, D), X.shape[0]) == pytest.approx(gm.bic(X[:, :D]))
    assert n_parameters(2, 5, background=True) == n_parameters(2, 5) + 1


@pytest.mark.parametrize("bad", ["0,8", "8,8", "-4", "4,,8", "x"])
def test_bad_k_lists_are_usage_errors(bad):
    res = CliRunner().invoke(main, ["select", "-k", bad, "--catalog", "nowhere"])
    assert res.exit_code == 2, res.output
    assert "-k" in res.output
    assert parse_ks(" 8, 16,32") == [8, 16, 32]


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """A generated mixture of 6 separated components in D = 3, as 3 Parquet files, + a job."""
    rng = np.random.default_rng(21)
    corners = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1]])
    m = 9.0 * corners + rng.normal(scale=0.5, size=(K_TRUE, 3))
    V = random_spd(rng, K_TRUE, 3, scale=rng.uniform(0.8, 1.6, size=K_TRUE), cond=4.0)
    w = rng.dirichlet(np.full(K_TRUE, 10.0))
    X, S, _, _ = draw_noisy(rng, w, m, V, 6000, noise_scale=0.3)
    root = tmp_path_factory.mktemp("six")
    write_catalog(root / "cat", X, S, 3)
    (root / "schema.toml").write_text(tomli_w.dumps(schema().to_dict()))
    job = root / "job.toml"
    job.write_text(
        tomli_w.dumps(
            {
                "catalog": {"path": str(root / "cat"), "schema": str(root / "schema.toml")},
                "fit": {"max_iter": 300, "tol": 1e-5, "seed": 1},
                "output": {"dir": str(root / "out"), "plots": False},
            }
        )
    )
    return job, root


@pytest.mark.cluster
def test_select_finds_k_true_through_the_cli(cluster, six):
    job, root = six
    args = ["select", str(job), "-k", "4,5,6,7,8", "--scheduler-address", cluster.scheduler_address]
    res = CliRunner().invoke(main, [*args, "--criterion", "bic"])
    assert res.exit_code == 0, res.output
    assert "<- chosen" in res.output and "select's default" in res.output
    table = json.loads((root / "out" / "select.json").read_text())
    rows = {r["n_components"]: r for r in table["rows"]}
    by_bic = min(rows, key=lambda k: rows[k]["bic"])
    by_heldout = max(rows, key=lambda k: rows[k]["heldout_mean_loglike"])
    assert by_bic == K_TRUE == table["chosen"]
    assert abs(by_heldout - K_TRUE) <= 1
    # the held-out and training rows are the two sides of a 10 % row split
    assert rows[6]["heldout_rows"] + rows[6]["train_rows"] == 6000
    assert 400 < rows[6]["heldout_rows"] < 800
    # BIC from the recorded training log-likelihood and the parameter count (p = 59 at K = 6)
    assert rows[6]["n_parameters"] == 5 + 18 + 36
    assert rows[6]["bic"] == pytest.approx(
        -2 * rows[6]["train_mean_loglike"] * rows[6]["train_rows"] + 59 * np.log(5400), rel=0.02
    )
    chosen = XDModel.load(root / "out" / "model.npz")
    assert chosen.n_components == K_TRUE and chosen.feature_names == FEATURES
    assert chosen.metadata["select"]["criterion"] == "bic"
    assert (root / "out" / "select.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for k in rows:
        assert (root / "out" / f"k{k}" / "model.npz").is_file()
    # JSON events: one per K, then the table; the held-out criterion; a rerun needs --overwrite
    again = CliRunner().invoke(main, [*args[:3], "5,6", *args[4:], "--log-format", "json"])
    assert again.exit_code == 2 and "checkpoints" in again.output
    res = CliRunner().invoke(
        main, [*args[:3], "5,6", *args[4:], "--log-format", "json", "--overwrite"]
    )
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert [e["n_components"] for e in events if e["event"] == "k_done"] == [5, 6]
    final = [e for e in events if e["event"] == "select"][-1]
    assert final["criterion"] == "heldout" and final["chosen"] == 6
    assert XDModel.load(root / "out" / "model.npz").metadata["select"]["chosen"] == 6


@pytest.mark.cluster
def test_select_reads_the_catalogue_and_draws_the_sample_once_for_all_k(cluster, six, tmp_path):
    """With fit.persist every K fits the same persisted partitions and the same k-means sample
    (shared_reads): the scheduler sees one read task per file and one sample pass in all."""
    from distributed import Client, get_task_stream

    job, root = six
    persisted = tmp_path / "job.toml"
    cfg = tomllib.loads(job.read_text())
    cfg["fit"]["persist"] = True
    cfg["output"]["dir"] = str(tmp_path / "out")
    persisted.write_text(tomli_w.dumps(cfg))
    args = ["select", str(persisted), "-k", "5,6", "--scheduler-address", cluster.scheduler_address]
    with Client(cluster.scheduler_address) as client, get_task_stream(client) as ts:
        res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    keys = [t["key"] for t in ts.data]
    prefix = [k[0] if isinstance(k, tuple) else str(k) for k in keys]
    reads = {k for k, p in zip(keys, prefix, strict=True) if p.startswith("xd-read-")}
    assert len(reads) == 3  # 3 files, read once for K = 5 and K = 6
    samples = {p for p in prefix if p.startswith("xd-kmeans-sample-")}
    assert len(samples) == 1  # one runner's sample pass served both K
    table = json.loads((tmp_path / "out" / "select.json").read_text())
    assert [r["n_components"] for r in table["rows"]] == [5, 6]

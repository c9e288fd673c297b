"""The catalogue a command reads (issue 11, problems 2-4): --on-bad on score and posterior,
every posterior row kept with its status, ids under their own column name, fit without a job
file, and a held-out catalogue that does not belong to the fitted one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomllib
from click.testing import CliRunner

from tests.shared_data import GAIA_DIR
from xd_dask.cli import main
from xd_dask.io import make_catalog
from xd_dask.model import XDModel
from xd_dask.params import Params

pytestmark = pytest.mark.cluster

GAIA_CONE = GAIA_DIR / "dr3_cone_ra45_dec0_r0.5.parquet"
SCHEMA = """
name = "stars"
id_column = "star_id"
[[feature]]
name = "x"
error = "x_err"
[[feature]]
name = "y"
error = "y_err"
"""
# rows 0-9; the bad ones and the reason the reader gives them
BAD = {2: "nonfinite_value", 4: "negative_error", 6: "missing_id", 8: "duplicate_id"}


@pytest.fixture(scope="module")
def stars(tmp_path_factory):
    """Two files of a 2-feature catalogue with a non-Gaia id column and 4 bad rows in file 0."""
    root = tmp_path_factory.mktemp("stars")
    rng = np.random.default_rng(5)
    files = []
    for f in range(2):
        n = 10
        ids = np.arange(100 * f, 100 * f + n, dtype=np.int64)
        x, y = rng.normal(0, 2, n), rng.normal(1, 1, n)
        x_err, y_err = np.full(n, 0.3), np.full(n, 0.2)
        mask = np.zeros(n, bool)
        if f == 0:
            x[2] = np.nan
            y_err[4] = -1.0
            mask[6] = True
            ids[8] = ids[7]
        table = pa.table(
            {
                "star_id": pa.array(ids, mask=mask),
                "x": x,
                "y": y,
                "x_err": x_err,
                "y_err": y_err,
            }
        )
        files.append(root / "cat" / f"part-{f}.parquet")
        files[-1].parent.mkdir(exist_ok=True)
        pq.write_table(table, files[-1])
    schema = root / "stars.toml"
    schema.write_text(SCHEMA)
    model = root / "model.npz"
    XDModel(
        Params([0.4, 0.6], [[0.0, 1.0], [2.0, 0.0]], [np.eye(2), [[2.0, 0.3], [0.3, 1.0]]]),
        ["x", "y"],
    ).save(model)
    return root, files, schema, model


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_posterior_keeps_every_row_with_its_status_and_id_name(stars, cluster, tmp_path):
    root, files, schema, model = stars
    addr = ["--scheduler-address", cluster.scheduler_address]
    base = ["posterior", model, root / "cat", tmp_path / "post", "--schema", schema, *addr]
    res = _run(*base)  # bad rows stop the read; the message says how to drop them
    assert res.exit_code == 1, res.output
    err = [ln for ln in res.output.splitlines() if ln.startswith("Error: ")]
    assert len(err) == 1 and "part-0.parquet: row 2" in err[0] and "--on-bad drop" in err[0]
    res = _run(*base, "--on-bad", "drop")
    assert res.exit_code == 0, res.output
    assert "Wrote 20 rows (16 ok, dropped 4 (" in res.output
    t = pq.read_table(sorted((tmp_path / "post").glob("*.parquet"))[0])
    assert t.column_names[0] == "star_id" and "source_id" not in t.column_names
    assert t.num_rows == 10  # every input row of file 0, in file order
    status = t["status"].to_pylist()
    assert status == [BAD.get(i, "ok") for i in range(10)]
    src = pq.read_table(files[0])
    assert t["star_id"].to_pylist() == src["star_id"].to_pylist()  # null id stays null
    bad = [i for i in range(10) if i in BAD]
    assert all(t["mean_x"][i].as_py() is None for i in bad)
    # the valid rows' posteriors equal the model's, computed here
    ok = np.array([i not in BAD for i in range(10)])
    X = np.stack([src["x"].to_numpy(), src["y"].to_numpy()], axis=1)[ok]
    S = np.zeros((ok.sum(), 2, 2))
    S[:, 0, 0], S[:, 1, 1] = 0.3**2, 0.2**2
    mean, _ = XDModel.load(model).posterior(X, S)
    np.testing.assert_allclose(t["mean_x"].to_numpy(zero_copy_only=False)[ok], mean[:, 0])
    done = json.loads((tmp_path / "post" / "_SUCCESS.json").read_text())
    assert done["rows"] == 20 and done["rows_ok"] == 16
    assert {k: v for k, v in done["dropped"].items() if v} == {r: 1 for r in BAD.values()}


def test_score_drops_and_counts_bad_rows(stars, cluster, tmp_path):
    root, files, schema, model = stars
    args = ["score", model, root / "cat", "--schema", schema, "--on-bad", "drop"]
    res = _run(*args, "--scheduler-address", cluster.scheduler_address, "--log-format", "json")
    assert res.exit_code == 0, res.output
    ev = next(json.loads(x) for x in res.output.splitlines() if '"score"' in x)
    assert ev["n_rows"] == 16 and ev["rows_read"] == 20
    assert {k: v for k, v in ev["dropped"].items() if v} == {r: 1 for r in BAD.values()}
    rows = []
    for f in files:
        t = pq.read_table(f)
        rows.append(np.stack([t["x"].to_numpy(), t["y"].to_numpy()], axis=1))
    X = np.concatenate(rows)[[i not in BAD for i in range(20)]]
    S = np.broadcast_to(np.diag([0.3**2, 0.2**2]), (16, 2, 2))
    assert ev["mean_loglike"] == pytest.approx(XDModel.load(model).log_density(X, S).mean())


def test_ids_in_two_files_are_bad_input_exit_2(stars, cluster, tmp_path):
    root, files, schema, model = stars
    cat = tmp_path / "cat"
    shutil.copytree(root / "cat", cat)
    shutil.copy(files[1], cat / "part-2.parquet")  # the same ids again
    res = _run(
        "score", model, cat, "--schema", schema, "--scheduler-address", cluster.scheduler_address
    )
    assert res.exit_code == 2, res.output
    assert "part-2.parquet" in res.output and "Traceback" not in res.output


@pytest.fixture(scope="module")
def synthetic_holdout(tmp_path_factory):
    """The demo's kind of held-out set: a synthetic Gaia-like sample."""
    out = tmp_path_factory.mktemp("demo") / "holdout"
    make_catalog(out, n_rows=600, n_partitions=1, seed=2)
    return out


def _fit(tmp_path, cluster, *args):
    out = tmp_path / "out"
    res = _run(
        "fit",
        *args,
        "-k",
        2,
        "--max-iter",
        2,
        "--out",
        out,
        "--scheduler-address",
        cluster.scheduler_address,
        "--set",
        "output.plots=false",
    )
    assert res.exit_code == 0, res.output
    return res.output, json.loads((out / "report.json").read_text()), out


def test_fit_without_a_job_file(cluster, tmp_path):
    output, report, out = _fit(tmp_path, cluster, "--catalog", GAIA_CONE, "--on-bad", "drop")
    job = tomllib.loads((out / "job.toml").read_text())
    assert job["fit"]["n_components"] == 2 and job["catalog"]["path"] == str(GAIA_CONE)
    assert job["fit"]["tol"] == 1e-4  # the rest are the packaged defaults
    assert report["n_iter"] == 2 and report["rows_used"] == 2390
    # stopped by max_iter: the summary says how far from converged, against tol
    ll = [h["mean_loglike"] for h in json.loads((out / "history.json").read_text())]
    assert report["last_change"] == pytest.approx(ll[-1] - ll[-2]) and report["tol"] == 1e-4
    line = next(ln for ln in output.splitlines() if ln.startswith("converged"))
    assert f"no: stopped at max_iter; last change {ll[-1] - ll[-2]:.2g} nats/row vs tol" in line
    assert "Warning: ConvergenceWarning: batch-em did not converge in 2 iterations" in output


def test_catalog_override_drops_the_job_files_holdout_with_a_warning(
    cluster, tmp_path, synthetic_holdout
):
    job = tmp_path / "demo.toml"
    job.write_text(f'[catalog]\npath = "elsewhere"\nholdout = "{synthetic_holdout}"\n')
    output, report, out = _fit(tmp_path, cluster, job, "--catalog", GAIA_CONE)
    warning = [ln for ln in output.splitlines() if ln.startswith("Warning: --catalog replaces")]
    assert len(warning) == 1 and str(synthetic_holdout) in warning[0] and str(job) in warning[0]
    assert report["heldout_mean_loglike"] is None  # not scored on the demo's synthetic rows


def test_holdout_unlike_the_catalogue_is_named(cluster, tmp_path, synthetic_holdout):
    args = ["--catalog", GAIA_CONE, "--holdout", synthetic_holdout]
    output, report, _ = _fit(tmp_path, cluster, *args)
    warning = [ln for ln in output.splitlines() if "HoldoutMismatchWarning" in ln]
    assert len(warning) == 1 and "does not look like the catalogue" in warning[0]
    assert "153 columns" in warning[0] or "against 153" in warning[0]
    assert report["heldout_rows"] == 600  # explicitly given: scored, with the warning
    # a held-out catalogue without the schema's columns is an error before the fit
    bare = tmp_path / "bare.parquet"
    pq.write_table(pa.table({"source_id": [1, 2], "ra": [1.0, 2.0]}), bare)
    res = _run(
        "fit",
        "--catalog",
        GAIA_CONE,
        "--holdout",
        bare,
        "--out",
        tmp_path / "o2",
        "--scheduler-address",
        cluster.scheduler_address,
    )
    assert res.exit_code == 2 and "catalog.holdout" in res.output and "missing" in res.output


def test_catalog_override_with_the_job_files_own_catalogue_keeps_its_holdout(
    cluster, tmp_path, synthetic_holdout
):
    job = tmp_path / "job.toml"
    job.write_text(f'[catalog]\npath = "{GAIA_CONE}"\nholdout = "{synthetic_holdout}"\n')
    output, report, _ = _fit(tmp_path, cluster, job, "--catalog", GAIA_CONE)
    assert "Warning: --catalog replaces" not in output
    assert report["heldout_rows"] == 600

"""`score` and `posterior` refuse what needs no cluster before they start or join one (issue
21.3): an output directory in use or holding other files, a schema without the model's
features, a catalogue without the schema's columns. Measured before: an existing posterior
directory was refused after 15.5-23.6 s (a local cluster started first); now in the time it
takes to import the package."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tomli_w
from click.testing import CliRunner

from tests.distributed_data import FEATURES, make_rows, schema, write_catalog
from xd_dask.cli import main
from xd_dask.estimator import XDGMM
from xd_dask.locks import FileLock
from xd_dask.model import XDModel

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 2-file catalogue of the known 3-d mixture, its schema and a K = 2 model of it."""
    root = tmp_path_factory.mktemp("apply")
    X, S = make_rows(3, 1200)
    write_catalog(root / "cat", X, S, 2)
    (root / "schema.toml").write_text(tomli_w.dumps(schema().to_dict()))
    model = root / "model.npz"
    XDModel(XDGMM(2, max_iter=20, tol=0.0).fit(X, S).params_, FEATURES).save(model)
    return root


def _connections(cluster) -> int:
    return sum("Receive client connection" in msg for _, msg in cluster.scheduler.get_logs())


def _case(case: str, root: Path, out: Path, stack: contextlib.ExitStack) -> tuple[list, str]:
    """(command line, a fragment of the refusal)."""
    model, cat, sch = str(root / "model.npz"), str(root / "cat"), str(root / "schema.toml")
    post = ["posterior", model, cat, str(out), "--schema", sch]
    if case == "posterior_foreign_file":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return post, "holds files this command did not write (e.g. 'notes.txt')"
    if case == "posterior_in_use":
        stack.enter_context(FileLock(out.parent / f".{out.name}.lock", "another posterior"))
        return post, "is in use by pid"
    if case == "score_per_row_foreign_file":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return ["score", model, cat, "--schema", sch, "--per-row", str(out)], "notes.txt"
    if case == "schema_without_the_model_features":
        return ["score", model, cat], "differ from the features"  # the default: gaia_dr3
    bad = schema().to_dict()
    bad["feature"][2]["column"] = "x7"
    (root / "x7.toml").write_text(tomli_w.dumps(bad))
    bad_post = ["posterior", model, cat, str(out), "--schema", str(root / "x7.toml")]
    return bad_post, "x7"


@pytest.mark.parametrize(
    "case",
    [
        "posterior_foreign_file",
        "posterior_in_use",
        "score_per_row_foreign_file",
        "schema_without_the_model_features",
        "catalogue_without_a_column",
    ],
)
def test_refused_before_the_cluster_is_joined(case, setup, cluster, tmp_path):
    out = tmp_path / "out"
    with contextlib.ExitStack() as stack:
        args, fragment = _case(case, setup, out, stack)
        seen = _connections(cluster)
        res = CliRunner().invoke(main, [*args, "--scheduler-address", cluster.scheduler_address])
    assert res.exit_code == 2, res.output
    assert fragment in res.output
    assert "Dask dashboard" not in res.output
    time.sleep(0.5)  # a connection would be in the scheduler's log by now
    assert _connections(cluster) == seen
    if case.endswith("foreign_file"):
        assert (out / "notes.txt").read_text() == "mine"  # untouched


def test_a_posterior_refusal_starts_no_local_cluster(setup, tmp_path):
    out = tmp_path / "post"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XD_DASK_") or "CACHE" in k}
    args = [str(BIN / "xd-dask"), "posterior", str(setup / "model.npz"), str(setup / "cat"),
            str(out), "--schema", str(setup / "schema.toml"), "-v"]  # fmt: skip
    t0 = time.perf_counter()
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    assert run.returncode == 2, run.stderr
    assert "notes.txt" in run.stderr
    assert "LocalCluster" not in run.stderr and "Dask dashboard" not in run.stdout
    assert seconds < 60  # generous: no cluster start


def test_checked_runs_still_write_their_outputs(setup, cluster, tmp_path):
    """The listing made before the cluster is the one the workers use: one part per file."""
    out = tmp_path / "post"
    args = ["posterior", str(setup / "model.npz"), str(setup / "cat"), str(out),
            "--schema", str(setup / "schema.toml"),
            "--scheduler-address", cluster.scheduler_address]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    parts = sorted(out.glob("posterior-*.parquet"))
    assert len(parts) == 2 and sum(pq.ParquetFile(p).metadata.num_rows for p in parts) == 1200
    res = CliRunner().invoke(main, args)  # its own output: replaced, not refused
    assert res.exit_code == 0, res.output

"""Flags mean the same in every command (issue 21.4's list of inconsistencies): -o is the
command's own output (render-job's script file; the fit's output directory is --out), -n/--rows
in demo as in make-catalog, shuffle takes the cluster options, --config, --set and
--log-format of the other commands, info's JSON is --log-format json, and --catalog is not
"(required)" when a job file sets it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from click.testing import CliRunner

from tests.distributed_data import make_rows, write_catalog
from xd_dask.cli import main
from xd_dask.model import XDModel
from xd_dask.params import Params

REPO = Path(__file__).resolve().parents[1]


def test_render_job_o_is_the_script_file_and_out_the_fits_directory(tmp_path):
    script = tmp_path / "job.sbatch"
    res = CliRunner().invoke(
        main,
        ["render-job", "--target", "slurm", str(REPO / "jobs" / "demo.toml"),
         "-o", str(script), "--out", "/scratch/fit-out"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    text = script.read_text()
    assert text.startswith("#!") and "/scratch/fit-out" in text
    assert res.output == ""  # the script went to the file, not to stdout
    res = CliRunner().invoke(
        main, ["render-job", "--target", "slurm", str(REPO / "jobs" / "demo.toml"), "-o", "x/"]
    )
    assert res.exit_code == 2 and "--out" in res.output


def test_demo_takes_n_like_make_catalog():
    for cmd in ("demo", "make-catalog"):
        assert "-n, --rows" in CliRunner().invoke(main, [cmd, "--help"]).output
    res = CliRunner().invoke(main, ["demo", "-n", "10"])
    assert res.exit_code == 2 and "Invalid value for '--rows' / '-n'" in res.output


def test_info_json_is_log_format_json(tmp_path):
    path = tmp_path / "model.npz"
    params = Params(np.array([0.5, 0.5]), np.zeros((2, 2)), np.array([np.eye(2)] * 2))
    XDModel(params, ["a", "b"], {"method": "em"}).save(path)
    res = CliRunner().invoke(main, ["info", str(path), "--log-format", "json"])
    assert res.exit_code == 0, res.output
    event = json.loads(res.output)
    assert event["event"] == "info" and event["n_components"] == 2


def test_catalog_is_not_shown_as_required():
    text = " ".join(CliRunner().invoke(main, ["fit", "--help"]).output.split())
    assert "(required)" not in text
    assert "needed here unless the job file sets it [catalog.path]" in text


@pytest.fixture
def catalogue(tmp_path):
    X, S = make_rows(2, 600)
    write_catalog(tmp_path / "cat", X, S, 2)
    return tmp_path / "cat"


def test_shuffle_takes_the_common_options_and_refuses_before_a_cluster(catalogue, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.parquet").write_bytes(b"")
    job = tmp_path / "job.toml"
    job.write_text(tomli_w.dumps({"cluster": {"n_workers": 1}}))
    res = CliRunner().invoke(
        main,
        ["shuffle", str(catalogue), str(out), "-p", "2", "--config", str(job),
         "--threads-per-worker", "1", "--set", "cluster.memory_limit=1GiB",
         "--log-format", "json"],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    (event,) = [json.loads(line) for line in res.stdout.splitlines()]
    assert event["event"] == "error" and "already exists" in event["message"]
    assert res.stderr == ""


@pytest.mark.cluster
def test_shuffle_json_event(catalogue, cluster, tmp_path):
    res = CliRunner().invoke(
        main,
        ["shuffle", str(catalogue), str(tmp_path / "out"), "-p", "3", "--log-format", "json",
         "--scheduler-address", cluster.scheduler_address],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in res.stdout.splitlines()]
    done = events[-1]
    assert done["event"] == "shuffle" and sum(done["rows"]) == 600 and len(done["files"]) == 3


def test_fit_check_checks_the_job_and_starts_nothing(tmp_path):
    """`fit --check` (run by deploy/local/run-job.sh and the rendered Slurm job before their
    clusters start): exit 0 with what would run, exit 2 with the reason, no output written
    and no cluster: the scheduler address given is never contacted."""
    cat = tmp_path / "gaia"
    made = CliRunner().invoke(
        main, ["make-catalog", str(cat), "--rows", "2000", "--partitions", "3", "--seed", "2"]
    )
    assert made.exit_code == 0, made.output
    out = tmp_path / "out"
    args = ["fit", "--catalog", str(cat), "--out", str(out), "--check"]
    args += ["--scheduler-address", "tcp://127.0.0.1:9"]  # nothing listens there
    res = CliRunner().invoke(main, [*args, "-k", "3", "--holdout-rows", "0.2"])
    assert res.exit_code == 0, res.output
    assert "Job checked: em fit, K = 3, 7 features, 2000 rows in 3 partitions" in res.output
    assert "No cluster was started" in res.output and not out.exists()
    res = CliRunner().invoke(main, [*args, "--method", "adam", "--log-format", "json"])
    (event,) = [json.loads(line) for line in res.stdout.splitlines()][-1:]
    assert res.exit_code == 0 and event["event"] == "checked", res.output
    assert (event["method"], event["rows"], event["partitions"]) == ("adam", 2000, 3)
    res = CliRunner().invoke(main, [*args, "-k", "0"])
    assert res.exit_code == 2 and "fit.n_components must be >= 1" in res.output
    (out / "checkpoints").mkdir(parents=True)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and f"xd-dask resume {out}" in res.output

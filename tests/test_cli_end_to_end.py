"""The CLI end to end against a real cluster: `dask scheduler` + two `dask worker` processes on
127.0.0.1, started by deploy/local/cluster.sh (so the local deployment is tested too).

make-catalog -> fit (em, as a real `xd-dask` subprocess; online with JSON events) -> resume ->
score -> posterior -> plot -> nightly (twice, then a rejected and a failed run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pyarrow.parquet as pq
import pytest
import tomllib
from click.testing import CliRunner

from xd_dask.cli import main
from xd_dask.jobs.store import ModelStore
from xd_dask.model import XDModel

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
N_ROWS, N_PARTS, K = 16_000, 8, 4


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XD_DASK_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def scheduler_file(tmp_path_factory):
    """Scheduler + 2 single-threaded workers on 127.0.0.1 (any free port), torn down after."""
    cdir = tmp_path_factory.mktemp("dask-local")
    env = _env(
        CLUSTER_DIR=str(cdir), SCHEDULER_PORT="0", DASHBOARD_ADDRESS=":0", WORKER_MEMORY="1GiB"
    )
    script = REPO / "deploy" / "local" / "cluster.sh"
    subprocess.run(
        ["bash", str(script), "start", "2", "1"],
        env=env,
        check=True,
        timeout=180,
        capture_output=True,
    )
    try:
        yield str(cdir / "scheduler.json")
    finally:
        pids = []
        for name in ("workers.pid", "scheduler.pid"):
            f = cdir / name
            if f.exists():
                pids += [int(x) for x in f.read_text().split()]
        subprocess.run(["bash", str(script), "stop"], env=env, timeout=60, capture_output=True)
        for pid in pids:  # only the processes this fixture started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog") / "gaia"
    res = CliRunner().invoke(
        main,
        [
            "make-catalog",
            str(out),
            "--rows",
            str(N_ROWS),
            "--partitions",
            str(N_PARTS),
            "--seed",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("*.parquet"))) == N_PARTS
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory, catalog):
    path = tmp_path_factory.mktemp("job") / "job.toml"
    path.write_text(
        f"""
[catalog]
path = "{catalog}"
schema = "gaia_dr3"
holdout_rows = 0.125

[fit]
n_components = {K}
method = "em"
max_iter = 4
tol = 0.0
seed = 2

[output]
checkpoint = true

[plots]
n_samples = 4000
max_rows = 4000
"""
    )
    return path


def _png(path) -> None:
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) > 200
    rgb = img[..., :3].reshape(-1, 3)
    assert np.unique(np.round(rgb, 2), axis=0).shape[0] > 20 and rgb.std() > 0.05


def _local_rows(paths):
    """(X, X_cov, ids) of catalogue files, read in this process (the independent reference)."""
    from xd_dask.io import load_schema, read_partition

    schema = load_schema("gaia_dr3")
    blocks = [read_partition(p, schema) for p in sorted(paths)]
    return (
        np.concatenate([b.X for b in blocks]),
        np.concatenate([b.X_cov for b in blocks]),
        np.concatenate([b.ids for b in blocks]),
    )


@pytest.fixture(scope="module")
def em_out(tmp_path_factory, job, scheduler_file):
    """`xd-dask fit` as a real subprocess against the running scheduler."""
    out = tmp_path_factory.mktemp("fit-em")
    proc = subprocess.run(
        [
            str(BIN / "xd-dask"),
            "fit",
            str(job),
            "--scheduler-file",
            scheduler_file,
            "--out",
            str(out),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_fit_em_outputs(em_out, catalog, scheduler_file):
    out, stdout = em_out
    assert "Dask dashboard: http" in stdout
    assert stdout.count("mean log-likelihood") >= 4  # one line per iteration (not a tty)
    assert "Fit finished" in stdout and "held-out mean log-lik." in stdout
    model = XDModel.load(out / "model.npz")
    assert model.n_components == K and model.feature_names[:2] == ["ra", "dec"]
    history = json.loads((out / "history.json").read_text())
    ll = [h["mean_loglike"] for h in history]
    assert len(ll) == 4 and all(np.isfinite(ll))
    # EM never decreases the log-likelihood
    assert all(b >= a - 1e-9 for a, b in zip(ll[:-1], ll[1:], strict=True)), ll
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["n_iter"] == 4
    # holdout_rows = 0.125: an eighth of the rows (by id hash, from every file) is held out and
    # scored; the fit used the others
    assert model.metadata["job"]["heldout"] == str(catalog)
    n_held = report["heldout_rows"]
    assert 0.09 * N_ROWS < n_held < 0.16 * N_ROWS
    assert report["rows_used"] == N_ROWS - n_held
    assert tomllib.loads((out / "job.toml").read_text())["fit"]["n_components"] == K
    for name in ("training_curve", "corner", "sky"):
        _png(out / f"{name}.png")
    # resume of a finished fit gives the same model without running iterations
    res = CliRunner().invoke(main, ["resume", str(out), "--scheduler-file", scheduler_file])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(XDModel.load(out / "model.npz").means, model.means)


def test_score_equals_direct_computation(em_out, catalog, scheduler_file, tmp_path):
    out, _ = em_out
    model = XDModel.load(out / "model.npz")
    res = CliRunner().invoke(
        main,
        [
            "score",
            str(out / "model.npz"),
            str(catalog),
            "--scheduler-file",
            scheduler_file,
            "--per-row",
            str(tmp_path / "rows"),
            "--log-format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    ev = [json.loads(line) for line in res.stdout.splitlines()]
    score = next(e for e in ev if e["event"] == "score")
    X, S, ids = _local_rows(catalog.glob("*.parquet"))
    direct = model.log_density(X, S)
    assert score["n_rows"] == N_ROWS
    assert score["mean_loglike"] == pytest.approx(direct.mean(), rel=1e-10, abs=1e-10)
    per_row = pq.read_table(sorted((tmp_path / "rows").glob("*.parquet"))).to_pydict()
    got = dict(zip(per_row["source_id"], per_row["log_likelihood"], strict=True))
    np.testing.assert_allclose([got[i] for i in ids], direct, rtol=1e-10)


def test_posterior_one_row_per_input_row(em_out, catalog, scheduler_file, tmp_path):
    out, _ = em_out
    model = XDModel.load(out / "model.npz")
    post = tmp_path / "post"
    res = CliRunner().invoke(
        main,
        [
            "posterior",
            str(out / "model.npz"),
            str(catalog),
            str(post),
            "--scheduler-file",
            scheduler_file,
        ],
    )
    assert res.exit_code == 0, res.output
    t = pq.read_table(sorted(post.glob("*.parquet")))
    X, S, ids = _local_rows(catalog.glob("*.parquet"))
    assert t.num_rows == N_ROWS
    assert sorted(t["source_id"].to_pylist()) == sorted(ids.tolist())
    cols = [c for c in t.column_names if c.startswith(("mean_", "cov_")) or c == "component_prob"]
    assert all(np.isfinite(t[c].to_numpy()).all() for c in cols)
    assert set(t["component"].to_numpy()) <= set(range(K))
    mean, _ = model.posterior(X, S)
    order = {sid: i for i, sid in enumerate(t["source_id"].to_pylist())}
    par = t["mean_parallax"].to_numpy()
    got = par[[order[i] for i in ids]]
    np.testing.assert_allclose(
        got, mean[:, model.feature_names.index("parallax")], rtol=1e-8, atol=1e-10
    )


def test_fit_online_json_events(job, scheduler_file, tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "fit",
            str(job),
            "--scheduler-file",
            scheduler_file,
            "--out",
            str(tmp_path / "on"),
            "--method",
            "online",
            "--epochs",
            "2",
            "--waves-per-epoch",
            "3",
            "--log-format",
            "json",
            "--set",
            "output.plots=false",
            "--set",
            "fit.step.kind=power",  # a decreasing step (the default, incremental EM, has none)
        ],
    )
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert events[0]["event"] == "start"
    prog = [e for e in events if e["event"] == "progress"]
    # the files are sky regions: waves are hash strata of the rows, 3 per epoch, 2 epochs
    assert len(prog) == 6 and all(e["total"] == 6 for e in prog)
    assert [e["epoch"] for e in prog] == [1, 1, 1, 2, 2, 2]
    steps = [e["step"] for e in prog]
    # the power schedule decreases
    assert all(a > b for a, b in zip(steps[:-1], steps[1:], strict=True))
    summary = events[-1]
    assert summary["event"] == "summary" and summary["method"] == "online"
    assert XDModel.load(tmp_path / "on" / "model.npz").metadata["method"] == "online"


def test_plot_command(em_out, catalog, tmp_path):
    out, _ = em_out
    res = CliRunner().invoke(
        main,
        [
            "plot",
            str(out / "model.npz"),
            "--catalog",
            str(catalog),
            "-o",
            str(tmp_path),
            "--n-samples",
            "3000",
            "--features",
            "parallax,bp_rp,phot_g_mean_mag",
        ],
    )
    assert res.exit_code == 0, res.output
    for name in ("training_curve", "corner", "sky"):
        _png(tmp_path / f"{name}.png")


def test_nightly_promotes_warm_starts_and_guards_latest(job, catalog, scheduler_file, tmp_path):
    store = tmp_path / "models"
    base = [
        "nightly",
        str(job),
        "--scheduler-file",
        scheduler_file,
        "--store",
        str(store),
        "--max-iter",
        "3",
        "--set",
        "output.plots=false",
        "--set",
        "output.checkpoint=false",
    ]
    runner = CliRunner()

    r1 = runner.invoke(main, base)
    assert r1.exit_code == 0, r1.output
    latest = store / "latest"
    first = latest.resolve()
    assert (first / "model.npz").is_file() and (first / "training_curve.png").is_file()
    rep1 = json.loads((first / "report.json").read_text())["nightly"]
    assert rep1["status"] == "promoted" and rep1["warm_start_from"] is None

    r2 = runner.invoke(main, base)
    assert r2.exit_code == 0, r2.output
    second = latest.resolve()
    assert second != first and second.parent == first.parent
    rep2 = json.loads((second / "report.json").read_text())["nightly"]
    assert rep2["status"] == "promoted" and rep2["warm_start_from"] == first.name
    init = XDModel.load(second / "model.npz").metadata["init"]
    assert init["method"] == "model" and Path(init["path"]).parent.name == first.name
    assert np.isfinite(rep2["previous_heldout_mean_loglike"])

    # a much worse model (K = 1, cold start) is rejected by the gate: latest stays
    r3 = runner.invoke(main, [*base, "-k", "1", "--set", "nightly.margin=0.0"])
    assert r3.exit_code == 1
    assert "rejected" in r3.output and "worse than the previous model" in r3.output
    assert latest.resolve() == second

    # a corrupt partition makes the fit fail: exit 1 with the reason, latest untouched
    bad = tmp_path / "bad-catalog"
    shutil.copytree(catalog, bad)
    victim = sorted(bad.glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated file
    r4 = runner.invoke(main, [*base, "--catalog", str(bad)])
    assert r4.exit_code == 1
    err = [ln for ln in r4.output.splitlines() if ln.startswith("Error: ")]
    assert len(err) == 1 and "failed" in err[0] and victim.name in err[0], r4.output
    assert latest.resolve() == second
    runs = ModelStore(store).runs()
    assert len(runs) == 4
    rep4 = json.loads((runs[-1] / "report.json").read_text())["nightly"]
    assert rep4["status"] == "failed" and victim.name in rep4["reason"]
    assert not (runs[-1] / "model.npz").exists()


@pytest.mark.slow
def test_deploy_local_run_job_script(job, tmp_path):
    """deploy/local/run-job.sh: starts its own scheduler + workers, fits, stops them."""
    cdir = tmp_path / "cluster"
    env = _env(
        CLUSTER_DIR=str(cdir), SCHEDULER_PORT="0", DASHBOARD_ADDRESS="none", WORKER_MEMORY="1GiB"
    )
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "deploy" / "local" / "run-job.sh"),
            str(job),
            "2",
            "--",
            "--out",
            str(tmp_path / "out"),
            "--max-iter",
            "2",
            "--set",
            "output.plots=false",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 workers x 1 threads" in proc.stdout and "Fit finished" in proc.stdout
    assert XDModel.load(tmp_path / "out" / "model.npz").metadata["n_iter"] == 2
    assert not (cdir / "scheduler.pid").exists()  # the cluster was stopped
    # a configuration error comes through as the script's exit code, before a cluster starts
    proc = subprocess.run(
        ["bash", str(REPO / "deploy" / "local" / "run-job.sh"), str(job), "1", "--", "-k", "0"],
        env=env | {"CLUSTER_DIR": str(tmp_path / "cluster2")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "fit.n_components must be >= 1" in proc.stderr
    assert not (tmp_path / "cluster2").exists()

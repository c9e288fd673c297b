"""The Slurm deployments on a real Slurm: the rendered job script and dask-jobqueue (issue 22).

deploy/slurm/local-slurm.sh runs a two-node Slurm on this machine (munged, slurmctld, ``slurmd -N
n1`` and ``slurmd -N n2`` on 127.0.0.1; .ci/run installs slurm-wlm and munge and starts it, the
fixture below starts it if it is not running and then stops it again). Nothing is stubbed:
``sbatch`` submits, slurmd runs the script, ``srun --het-group=1`` starts a real ``dask worker``
on the other node, dask-jobqueue submits worker jobs. The tests skip when Slurm is not installed.
The cluster stays on loopback (``deploy.slurm.interface = lo``) and on ports chosen at run time.

The dask-jobqueue configuration is also checked without Slurm: every key that dask-jobqueue's
own ``jobqueue.slurm`` section has (it reads each one for a custom ``config_name``) is in both
shipped sections, and a SLURMCluster built from them writes a worker job script.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dask
import pytest
import yaml
from click.testing import CliRunner

from xd_dask.cli import main
from xd_dask.model import XDModel

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCAL_SLURM = REPO / "deploy" / "slurm" / "local-slurm.sh"
JOBQUEUE_YAML = REPO / "deploy" / "slurm" / "jobqueue.yaml"
_SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_SLURM_BINARIES = ("sbatch", "scontrol", "slurmctld", "slurmd", "munged")
_MISSING = [b for b in _SLURM_BINARIES if not shutil.which(b, path=_SBIN)]
_skip_without_slurm = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"Slurm is not installed ({', '.join(_MISSING)} not found): "
    "apt-get install slurm-wlm munge",
)


def needs_slurm(test):
    """Mark ``test`` as a real-Slurm test (``-m slurm``), skipped when Slurm is not installed."""
    return pytest.mark.slurm(_skip_without_slurm(test))


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
# the small job every test runs: 1 worker of 1 core on nodes of 1 CPU, K = 2
SMALL = [
    "-k", "2",
    "--max-iter", "6",
    "--tol", "0.01",
    "--holdout", "",
    "--set", "deploy.n_workers=1",
    "--set", "deploy.worker_cores=1",
    "--set", "deploy.worker_memory=3GiB",
    "--set", "deploy.scheduler_memory=1GiB",
    "--set", "deploy.walltime=00:10:00",
    "--set", "deploy.slurm.interface=lo",
    "--set", "deploy.slurm.dashboard_address=127.0.0.1:0",
    "--set", "plots.n_samples=4000",
    "--set", "plots.max_rows=2000",
]  # fmt: skip


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """The environment of a submitting user: SLURM_CONF of the local Slurm, this Python first on
    PATH (the job scripts run `dask`, `python` and `xd-dask` from it)."""
    was_up = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True).returncode
    start = subprocess.run(
        ["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True, timeout=180
    )
    assert start.returncode == 0, start.stdout + start.stderr
    conf = re.search(r"^export SLURM_CONF=(.+)$", start.stdout, re.M)
    assert conf, start.stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XD_DASK_", "SLURM_"))}
    env |= {"SLURM_CONF": conf.group(1), "PATH": f"{BIN}{os.pathsep}{_SBIN}"}
    try:
        yield env
    finally:
        if was_up != 0:  # this fixture started the daemons: stop them
            subprocess.run(["bash", str(LOCAL_SLURM), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slurm-catalog") / "gaia"
    res = CliRunner().invoke(
        main, ["make-catalog", str(out), "--rows", "3000", "--partitions", "2", "--seed", "5"]
    )
    assert res.exit_code == 0, res.output
    return out


def _render(tmp_path: Path, catalog: Path, *extra: str) -> Path:
    script = tmp_path / "job.sbatch"
    res = CliRunner().invoke(
        main,
        [
            "render-job", "--target", "slurm", str(REPO / "jobs" / "demo.toml"),
            "--catalog", str(catalog), "--set", f"output.dir={tmp_path / 'out'}",
            *SMALL, *extra, "--output", str(script),
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return script


def _sbatch(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sbatch", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def _wait(job_id: str, env: dict[str, str], timeout: float = 300) -> list[dict[str, str]]:
    """Each component of the job (scontrol show job), once all have ended."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True
        ).stdout
        comps = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line]
        if comps and all(c["JobState"] in FINAL for c in comps):
            return comps
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], env=env)
            raise AssertionError(f"job {job_id} did not end in {timeout} s:\n{out}")
        time.sleep(1)


def _assert_clean_log(log: str) -> None:
    """What a successful run must not print: tracebacks of the teardown (CommClosedError from
    the worker when the scheduler vanished) and srun killing or cancelling the worker step."""
    for bad in ("Traceback", "CommClosedError", "Killed", "CANCELLED", "srun: error"):
        assert bad not in log, f"{bad!r} in the job log:\n{log[-4000:]}"


@pytest.mark.slow
@needs_slurm
def test_rendered_job_runs_on_two_slurm_nodes_and_ends_cleanly(slurm, catalog, tmp_path):
    script = _render(tmp_path, catalog)
    sub = _sbatch(["--parsable", str(script)], slurm, tmp_path)
    assert sub.returncode == 0, sub.stderr  # main: --mem and --mem-per-cpu are exclusive
    job_id = sub.stdout.strip().split(";")[0]
    comps = _wait(job_id, slurm)
    log = (tmp_path / f"xd-dask-fit-{job_id}.log").read_text()
    assert [(c["JobState"], c["ExitCode"]) for c in comps] == [("COMPLETED", "0:0")] * 2, log
    # a heterogeneous job: the scheduler and the fit on one node, the worker on the other
    assert len({c["NodeList"] for c in comps}) == 2, comps
    model = XDModel.load(tmp_path / "out" / "model.npz")
    assert model.n_components == 2 and len(model.feature_names) == 7
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "ok" and report["rows_used"] == 3000
    assert report["n_components"] == 2 and report["partitions"] == 2
    assert all(Path(report["files"][k]).stat().st_size > 0 for k in ("corner", "sky"))
    assert "Fit finished" in log
    # the nanny stopped the worker, then the scheduler shut down: both said so, nothing killed
    assert "Nanny asking worker to close. Reason: job-end" in log
    assert "End scheduler" in log and "End worker" in log
    _assert_clean_log(log)


@needs_slurm
def test_rendered_job_checks_the_job_before_any_cluster_process_starts(slurm, catalog, tmp_path):
    """A catalogue gone between render-job and the job's start: the job ends with the fit's
    exit code 2 naming it, before a scheduler or a worker started."""
    gone = tmp_path / "gaia"
    shutil.copytree(catalog, gone)
    script = _render(tmp_path, gone)
    shutil.rmtree(gone)
    sub = _sbatch(["--parsable", str(script)], slurm, tmp_path)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    comps = _wait(job_id, slurm)
    log = (tmp_path / f"xd-dask-fit-{job_id}.log").read_text()
    assert comps[0]["ExitCode"] == "2:0", (comps, log)
    assert str(gone) in log, log
    assert "scheduler" not in log.lower() and "worker" not in log.lower(), log
    assert not list(tmp_path.glob("*scheduler.json"))


@needs_slurm
def test_rendered_gpu_job_passes_sbatch_test_only(slurm, catalog, tmp_path):
    """The GPU script is valid for a partition whose nodes declare `Gres=gpu` (local-slurm.sh's
    `gpu`: /dev/null stands in for the device, so the job is validated, not run)."""
    gpu = ["--set", "deploy.n_workers=0", "--set", "deploy.gpu_workers=1"]
    script = _render(tmp_path, catalog, *gpu, "--set", "deploy.slurm.gpu_partition=gpu")
    text = script.read_text()
    assert "#SBATCH --gpus-per-task=1" in text and "dask cuda worker" in text
    res = _sbatch(["--test-only", str(script)], slurm, tmp_path)
    assert res.returncode == 0, res.stderr  # main: --mem and --mem-per-cpu are exclusive
    assert "to start at" in res.stderr, res.stderr
    # the check is real: no node of the partition has two GPUs
    two = tmp_path / "two-gpus.sbatch"
    two.write_text(text.replace("--gpus-per-task=1", "--gpus-per-task=2"))
    res = _sbatch(["--test-only", str(two)], slurm, tmp_path)
    assert res.returncode != 0, res.stderr
    assert "Requested node configuration is not available" in res.stdout + res.stderr


# --------------------------------------------------------------------------- dask-jobqueue
def _jobqueue_defaults() -> dict:
    """dask-jobqueue's own `jobqueue.slurm` section: every key it reads, for this version."""
    dj = pytest.importorskip("dask_jobqueue")
    text = (Path(dj.__file__).parent / "jobqueue.yaml").read_text()
    return yaml.safe_load(text)["jobqueue"]["slurm"]


def test_shipped_jobqueue_yaml_has_every_key_dask_jobqueue_reads():
    defaults = _jobqueue_defaults()
    shipped = yaml.safe_load(JOBQUEUE_YAML.read_text())["jobqueue"]
    assert sorted(shipped) == ["xd-dask-cpu", "xd-dask-gpu"]
    for name, section in shipped.items():
        # a missing key is a KeyError in SLURMCluster(config_name=...) (main: shared-temp-directory)
        assert sorted(set(defaults) - set(section)) == [], name
        # a misspelt key would be ignored silently
        assert sorted(set(section) - set(defaults)) == [], name
        # the deprecated spellings stay null: anything else is a FutureWarning
        assert all(section[k] is None for k in ("extra", "env-extra", "job-extra")), name


def test_slurm_cluster_builds_from_the_shipped_config(tmp_path, monkeypatch):
    """What `SLURMCluster(config_name=...)` reads with the shipped file as the user's config
    (no Slurm needed: the scheduler starts in this process, no job is submitted). It makes its
    log directory (relative, as shipped) in the working directory: a temporary one here."""
    SLURMCluster = pytest.importorskip("dask_jobqueue").SLURMCluster
    monkeypatch.chdir(tmp_path)

    shipped = yaml.safe_load(JOBQUEUE_YAML.read_text())["jobqueue"]
    options = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
    with dask.config.set({f"jobqueue.{name}": section for name, section in shipped.items()}):
        for name in shipped:
            with SLURMCluster(config_name=name, scheduler_options=options) as cluster:
                script = cluster.job_script()
            assert "#SBATCH -n 1" in script and "--nthreads" in script, script
            # $TMPDIR may be unset in a Slurm job: the worker then falls back to /tmp
            assert '--local-directory "${TMPDIR:-/tmp}"' in script, script
            gpu = "--gpus-per-task=1" in script and "--resources GPU=1" in script
            assert gpu == (name == "xd-dask-gpu"), script
    assert (tmp_path / "xd-dask-logs").is_dir()


@needs_slurm
def test_jobqueue_fit_runs_on_slurm_job_workers(slurm, catalog, tmp_path):
    """deploy/slurm/jobqueue_fit.py with the shipped jobqueue.yaml as the user's dask config
    (DASK_CONFIG, as ~/.config/dask would be): the worker is a Slurm job, the fit writes its
    model, and the worker job ends COMPLETED (retired, not cancelled) before the script exits."""
    dask_dir = tmp_path / "dask-config"
    dask_dir.mkdir()
    shutil.copy(JOBQUEUE_YAML, dask_dir / "jobqueue.yaml")
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
[catalog]
path = "{catalog}"
schema = "gaia_dr3"
[fit]
n_components = 2
method = "em"
max_iter = 6
[output]
dir = "{out}"
checkpoint = false
[plots]
n_samples = 4000
max_rows = 2000
[deploy]
n_workers = 1
worker_cores = 1
worker_memory = "3GiB"
walltime = "00:10:00"
[deploy.slurm]
interface = "lo"
dashboard_address = "127.0.0.1:0"
"""
    )
    env = slurm | {"DASK_CONFIG": str(dask_dir)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "slurm" / "jobqueue_fit.py"), str(job)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    model = XDModel.load(out / "model.npz")
    assert model.n_components == 2 and len(model.feature_names) == 7
    # the worker ran as a Slurm job (its log is in the shipped log-directory)
    (err,) = (tmp_path / "xd-dask-logs").glob("xd-dask-worker-*.err")
    job_id = err.stem.rsplit("-", 1)[1]
    (comp,) = _wait(job_id, slurm, timeout=60)
    assert (comp["JobState"], comp["ExitCode"]) == ("COMPLETED", "0:0"), comp
    worker_log = err.read_text()
    assert "Start worker at:      tcp://127.0.0.1:" in worker_log, worker_log
    assert "Traceback" not in worker_log and "Traceback" not in proc.stderr, proc.stderr

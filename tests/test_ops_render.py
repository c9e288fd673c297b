"""Hostile values through render-job and deploy/local/cluster.sh never execute (issue 10.2).

The generated Slurm script and cluster.sh are RUN, with stub ``dask``, ``srun``, ``python`` and
``xd-dask`` commands first on PATH that record their arguments (NUL-separated, so that any byte
survives). Every hostile value carries ``$(touch MARKER)``, backquotes, quotes, a semicolon or a
newline: the marker files must not exist afterwards, and the values must reach the commands
byte for byte. Values that go into #SBATCH lines or Kubernetes names unquoted are refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import tomllib
import yaml
from click.testing import CliRunner

from xd_dask.cli import main
from xd_dask.jobs.config import ConfigError, load_config
from xd_dask.jobs.render import render_job

REPO = Path(__file__).resolve().parents[1]

STUB = r"""#!/bin/bash
# record this call: the command name and every argument, NUL-separated
f="$STUB_DIR/call.$(basename "$0").$$.$RANDOM"
printf '%s\0' "$(basename "$0")" "$@" > "$f"
prev=""
for a in "$@"; do  # `dask scheduler --scheduler-file F`: write the scheduler file
    if [ "$prev" = "--scheduler-file" ] && [ "$(basename "$0")" = dask ] && [ "$1" = scheduler ]
    then printf '{"address": "tcp://127.0.0.1:1"}' > "$a"; fi
    prev="$a"
done
if [ "$(basename "$0")" = xd-dask ]; then  # the check: $CHECK_EXIT, the fit: $FIT_EXIT
    cp "$2" "$STUB_DIR/job.toml.seen"
    [ "${3:-}" = --check ] && exit "${CHECK_EXIT:-0}"
    exit "${FIT_EXIT:-0}"
fi
exit 0
"""


def _hostile(tag: str) -> str:
    """A value that creates MARK<tag>* files (in the working directory) if a shell runs it."""
    m = f"MARK{tag}"
    return f"a b'c\"$(touch {m}1)`touch {m}2`;touch {m}3 \\ $HOME"


def _stubs(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    bin_dir, calls = tmp_path / "stub-bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    for name in ("dask", "srun", "python", "xd-dask", "sbatch"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "STUB_DIR": str(calls),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
    }
    return calls, env


def _calls(calls: Path, name: str) -> list[list[str]]:
    out = []
    for f in sorted(calls.glob(f"call.{name}.*")):
        parts = f.read_bytes().split(b"\0")[:-1]
        out.append([p.decode() for p in parts[1:]])
    return out


def _no_markers(tmp_path: Path) -> None:
    found = [p for p in tmp_path.rglob("MARK*")]
    assert found == [], f"hostile code ran: {found}"


def test_hostile_paths_reach_the_slurm_script_commands_intact(tmp_path):
    catalog = _hostile("cat") + "\nXD_DASK_JOB_TOML\ntouch MARKheredoc"
    out_dir = _hostile("out")
    cfg = load_config(
        overrides={
            "catalog.path": catalog,
            "output.dir": out_dir,
            "deploy.name": "fit.job_1-x",
            "deploy.n_workers": 2,
            "deploy.gpu_workers": 1,
            "deploy.worker_memory": "10GiB",
            "deploy.slurm.account": "acct_1",
        },
        environ={},
    )
    script = tmp_path / "fit.sbatch"
    script.write_text(render_job(cfg, "slurm"))
    submit = tmp_path / _hostile("submit")  # the submit directory
    submit.mkdir()
    calls, env = _stubs(tmp_path)
    env |= {"SLURM_SUBMIT_DIR": str(submit), "SLURM_JOB_ID": "42"}
    proc = subprocess.run(
        ["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _no_markers(tmp_path)
    sched = f"{submit}/fit.job_1-x-42-scheduler.json"
    (scheduler,) = _calls(calls, "dask")
    assert scheduler[:3] == ["scheduler", "--scheduler-file", sched]
    srun = _calls(calls, "srun")
    assert sorted(c[0] for c in srun) == ["--het-group=1", "--het-group=2"]
    assert all(c[c.index("--scheduler-file") + 1] == sched for c in srun)
    assert all(c[c.index("--memory-limit") + 1] == "9216MiB" for c in srun)  # 90 % of 10 GiB
    # waiting for the workers, then (the EXIT trap) stopping them and the scheduler
    wait, stop = sorted(_calls(calls, "python"), key=lambda c: "stop_workers" in c[1])
    assert wait[0] == "-c" and wait[2:] == [sched, "3"]
    assert stop[0] == "-c" and "stop_workers(c); c.shutdown()" in stop[1] and stop[2:] == [sched]
    check, fit = sorted(_calls(calls, "xd-dask"), key=len)  # the check before any process
    assert check == ["fit", f"{submit}/fit.job_1-x-42.toml", "--check"]
    assert fit == ["fit", f"{submit}/fit.job_1-x-42.toml", "--scheduler-file", sched]
    seen = tomllib.loads((calls / "job.toml.seen").read_text())
    assert seen["catalog"]["path"] == catalog and seen["output"]["dir"] == out_dir


def test_the_slurm_script_stops_the_cluster_and_exits_with_the_fits_code(tmp_path):
    cfg = load_config(overrides={"catalog.path": "/data/gaia", "deploy.n_workers": 1}, environ={})
    script = tmp_path / "fit.sbatch"
    script.write_text(render_job(cfg, "slurm"))
    calls, env = _stubs(tmp_path)
    env |= {"SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "7", "FIT_EXIT": "3"}
    proc = subprocess.run(
        ["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr  # the fit's exit code
    assert len(_calls(calls, "xd-dask")) == 2  # the check, then the fit
    stops = [c for c in _calls(calls, "python") if "stop_workers" in c[1]]
    assert [c[2:] for c in stops] == [[f"{tmp_path}/xd-dask-fit-7-scheduler.json"]]
    # a job the check refuses ends with its exit code before any cluster process starts
    shutil.rmtree(calls)
    calls.mkdir()
    proc = subprocess.run(
        ["bash", str(script)],
        env=env | {"CHECK_EXIT": "2"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert [p.name.split(".")[1] for p in calls.glob("call.*")] == ["xd-dask"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("deploy.name", "fit$(touch MARK)"),
        ("deploy.name", "fit\n#SBATCH --x"),
        ("deploy.slurm.account", "acct\ntouch MARK"),
        ("deploy.slurm.partition", "cpu; touch MARK"),
        ("deploy.slurm.gpu_partition", "gpu`touch MARK`"),
        ("deploy.walltime", "01:00:00\ntouch MARK"),
        ("deploy.image", "img $(touch MARK)"),
        ("deploy.slurm.setup", "module load x\rtouch MARK"),
        ("deploy.config_path", "/etc/x\n/job.toml"),
        ("deploy.kubernetes.namespace", "ns\n---"),
        ("deploy.slurm.dashboard_address", "0.0.0.0:8787 & touch MARK"),
    ],
)
@pytest.mark.parametrize("target", ["slurm", "kubernetes"])
def test_hostile_names_are_refused_by_render_job(tmp_path, key, value, target):
    job = tmp_path / "job.toml"
    job.write_text('[catalog]\npath = "/data/gaia"\n')
    res = CliRunner().invoke(
        main, ["render-job", "--target", target, str(job), "--set", f"{key}={value}"]
    )
    assert res.exit_code == 2, res.output
    assert key in res.output and "Traceback" not in res.output
    assert not list(tmp_path.glob("MARK*"))


def test_kubernetes_names_are_checked_and_paths_stay_values(tmp_path):
    base = {"catalog.path": "/data/gaia", "deploy.n_workers": 2}
    with pytest.raises(ConfigError, match="Kubernetes name"):
        render_job(load_config(overrides=base | {"deploy.name": "Fit_1"}, environ={}), "kubernetes")
    assert "#SBATCH --job-name=Fit_1" in render_job(
        load_config(overrides=base | {"deploy.name": "Fit_1"}, environ={}), "slurm"
    )
    hostile = _hostile("k8s") + "\n---\nkind: Pod\nmetadata: {name: evil}\n"
    config_path = "/etc/x'd\"$(touch M)/job.toml"
    cfg = load_config(
        overrides=base | {"catalog.path": hostile, "deploy.config_path": config_path},
        environ={},
    )
    docs = list(yaml.safe_load_all(render_job(cfg, "kubernetes")))
    assert [d["kind"] for d in docs] == ["ConfigMap", "DaskJob"]  # no document injected
    assert tomllib.loads(docs[0]["data"]["job.toml"])["catalog"]["path"] == hostile
    runner = docs[1]["spec"]["job"]["spec"]["containers"][0]
    assert runner["args"][2] == config_path
    assert runner["volumeMounts"][0]["mountPath"] == "/etc/x'd\"$(touch M)"


def test_cluster_sh_passes_a_hostile_cluster_dir_as_data(tmp_path):
    cdir = tmp_path / _hostile("cdir")
    calls, env = _stubs(tmp_path)
    env |= {"CLUSTER_DIR": str(cdir), "SCHEDULER_PORT": "0", "DASHBOARD_ADDRESS": ":0"}
    script = REPO / "deploy" / "local" / "cluster.sh"
    for args in (["start", "2", "1"], ["status"], ["stop"]):
        proc = subprocess.run(
            ["bash", str(script), *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, (args, proc.stdout + proc.stderr)
        for _ in range(200):  # the workers start in the background: let both stubs record
            if args[0] != "start" or len(_calls(calls, "dask")) == 3:
                break
            time.sleep(0.05)
    _no_markers(tmp_path)
    sched = f"{cdir}/scheduler.json"
    dask = _calls(calls, "dask")
    (scheduler,) = [c for c in dask if c[0] == "scheduler"]
    assert scheduler[scheduler.index("--scheduler-file") + 1] == sched
    # loopback by default: the scheduler host and a port-only dashboard address
    assert scheduler[scheduler.index("--host") + 1] == "127.0.0.1"
    assert scheduler[scheduler.index("--dashboard-address") + 1] == "127.0.0.1:0"
    workers = [c for c in dask if c[0] == "worker"]
    assert len(workers) == 2 and all(w[w.index("--host") + 1] == "127.0.0.1" for w in workers)
    assert all(w[w.index("--local-directory") + 1].startswith(str(cdir)) for w in workers)
    py = _calls(calls, "python")
    assert sorted(c[2:] for c in py) == [[sched], [sched, "2"]]

"""render-job: the Slurm script and Kubernetes manifests generated from a job config."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml
from click.testing import CliRunner

from xd_dask.cli import main
from xd_dask.jobs.config import ConfigError, load_config
from xd_dask.jobs.render import render_job

BASE = {
    "catalog.path": "/data/gaia",
    "deploy.name": "xdtest",
    "deploy.n_workers": 6,
    "deploy.worker_cores": 3,
    "deploy.worker_memory": "12GiB",
    "deploy.walltime": "02:30:00",
}


def _embedded_toml(script: str) -> dict:
    body = re.search(r"<<'XD_DASK_JOB_TOML'\n(.*?)\nXD_DASK_JOB_TOML\n", script, re.S)
    assert body, "no embedded job file"
    return tomllib.loads(body.group(1))


def test_slurm_cpu_script_has_resources_and_runs_the_same_config():
    cfg = load_config(overrides=dict(BASE, **{"deploy.slurm.partition": "cpu"}), environ={})
    text = render_job(cfg, "slurm")
    assert text.startswith("#!/bin/bash\n")
    lines = text.splitlines()
    het = lines.index("#SBATCH hetjob")
    for line in ["#SBATCH --job-name=xdtest", "#SBATCH --time=02:30:00"]:
        assert line in lines[:het]
    # component 0: the scheduler and the fit, sized by deploy.scheduler_* (+ the fit's plots:
    # 4 GiB + 1 GiB + 7 features x (160 B x 50000 samples + 32 B x 50000 rows) -> 5376 MiB)
    assert lines[lines.index("#SBATCH --output=xdtest-%j.log") + 1 : het] == [
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --partition=cpu",
        "#SBATCH --mem-per-cpu=5376M",
    ]
    # component 1: the workers
    assert lines[het + 1 : het + 5] == [
        "#SBATCH --ntasks=6",
        "#SBATCH --cpus-per-task=3",
        "#SBATCH --partition=cpu",
        "#SBATCH --mem-per-cpu=4096M",  # 12 GiB / 3 cores
    ]
    assert text.count("hetjob") == 1 and "cuda" not in text
    assert "dask scheduler --scheduler-file" in text
    assert re.search(
        r"srun --het-group=1 --ntasks=6 --cpus-per-task=3 dask worker .*--nthreads 3", text
    )
    # 90 % of the 12 GiB Slurm grants each worker: Dask acts before the OOM killer does
    assert "--memory-limit 11059MiB" in text
    # sbatch refuses --mem beside --mem-per-cpu (and --mem would reach the later components)
    assert not re.search(r"^#SBATCH --mem=", text, re.M)
    # a free port (two jobs' schedulers may share a node); the default interface
    assert 'dask scheduler --scheduler-file "$SCHED_FILE" --port 0 --dashboard-address' in text
    assert "--interface" not in text
    assert 'xd-dask fit "$JOB_TOML" --scheduler-file "$SCHED_FILE"' in text
    assert "dask-worker" not in text and "dask-scheduler" not in text
    embedded = _embedded_toml(text)
    assert embedded["catalog"]["path"] == "/data/gaia"
    assert embedded["fit"] == cfg["fit"]
    assert embedded["cluster"]["scheduler_file"] == ""  # given on the command line instead
    if shutil.which("bash"):
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_slurm_memory_per_cpu_interface_and_teardown():
    """Component 0's memory is split over its cores; deploy.slurm.interface reaches the scheduler
    and every worker; the EXIT trap stops the workers through their nannies and the scheduler,
    then exits with the status the script had (the fit's)."""
    over = dict(
        BASE,
        **{
            "deploy.scheduler_cores": 3,
            "deploy.gpu_workers": 1,
            "deploy.slurm.interface": "ib0",
            "deploy.slurm.dashboard_address": "none",
        },
    )
    text = render_job(load_config(overrides=over, environ={}), "slurm")
    lines = text.splitlines()
    het = lines.index("#SBATCH hetjob")
    # (4 GiB + 1280 MiB for the fit's plots) / 3 cores, rounded up
    assert "#SBATCH --mem-per-cpu=1792M" in lines[:het]
    assert sum(line.startswith("#SBATCH --mem-per-cpu=") for line in lines) == 3
    assert (
        "--port 0 --interface ib0 --no-dashboard --dashboard-address 127.0.0.1:0 "
        "--preload xd_dask.dashboard.preload &"
    ) in text  # the HTTP server (/health, /metrics) on loopback, not 0.0.0.0:8787
    workers = [line for line in lines if line.startswith("srun ")]
    assert len(workers) == 2 and all("--interface ib0 " in w for w in workers)
    trap = text[text.index("stop_cluster() {") : text.index("trap stop_cluster EXIT")]
    assert trap.index("local status=$?") < trap.index("stop_workers(c); c.shutdown()")
    assert trap.rstrip().endswith('exit "$status"\n}')
    assert text.index("trap stop_cluster EXIT") < text.index("dask scheduler --scheduler-file")
    bad = dict(over, **{"deploy.slurm.interface": "ib0; touch MARK"})
    with pytest.raises(ConfigError, match="deploy.slurm.interface"):
        load_config(overrides=bad, environ={})


def test_slurm_gpu_workers_make_a_heterogeneous_job():
    over = dict(BASE, **{"deploy.gpu_workers": 2, "deploy.slurm.gpu_partition": "gpu"})
    text = render_job(load_config(overrides=over, environ={}), "slurm")
    lines = text.splitlines()
    het = [i for i, line in enumerate(lines) if line == "#SBATCH hetjob"]
    assert len(het) == 2
    assert "#SBATCH --ntasks=1" in lines[: het[0]]
    assert "#SBATCH --ntasks=6" in lines[het[0] : het[1]]
    assert "#SBATCH --ntasks=2" in lines[het[1] :]
    assert "#SBATCH --gpus-per-task=1" in lines[het[1] :]
    assert "#SBATCH --partition=gpu" in lines[het[1] :]
    assert re.search(r"srun --het-group=1 --ntasks=6 .*dask worker", text)
    assert re.search(r"srun --het-group=2 --ntasks=2 .*dask cuda worker .*--resources GPU=1", text)
    assert re.search(r"wait_for_workers\(int\(sys.argv\[2\]\).*\"\$SCHED_FILE\" 8$", text, re.M)


def test_kubernetes_manifest_parses_and_carries_resources():
    over = dict(
        BASE,
        **{
            "deploy.gpu_workers": 2,
            "deploy.kubernetes.namespace": "astro",
            "deploy.kubernetes.volume_claim": "gaia-pvc",
            "fit.n_components": 64,
        },
    )
    cfg = load_config(overrides=over, environ={})
    docs = list(yaml.safe_load_all(render_job(cfg, "kubernetes")))
    assert [d["kind"] for d in docs] == ["ConfigMap", "DaskJob", "DaskWorkerGroup"]
    cm, job, gpu = docs
    assert all(d["metadata"]["namespace"] == "astro" for d in docs)
    # the job runs the same config, from the ConfigMap
    toml = tomllib.loads(cm["data"]["job.toml"])
    assert toml["fit"]["n_components"] == 64 and toml["catalog"]["path"] == "/data/gaia"
    runner = job["spec"]["job"]["spec"]["containers"][0]
    assert runner["args"][:3] == ["xd-dask", "fit", "/etc/xd-dask/job.toml"]
    cluster = job["spec"]["cluster"]["spec"]
    worker = cluster["worker"]
    assert worker["replicas"] == 6
    wc = worker["spec"]["containers"][0]
    assert wc["args"][:2] == ["dask", "worker"]
    assert wc["resources"]["limits"] == {"cpu": "3", "memory": "12288Mi"}
    limit = wc["args"][wc["args"].index("--memory-limit") + 1]
    assert limit == "11059MiB"  # 90 % of the pod's limit
    # the runner pod draws the plots' samples: 1 GiB + 7 x (160 B x 50000 + 32 B x 50000)
    assert runner["resources"]["requests"]["memory"] == "1280Mi"
    assert {"name": "data", "mountPath": "/data"} in wc["volumeMounts"]
    sc = cluster["scheduler"]["spec"]["containers"][0]
    assert sc["args"] == ["dask", "scheduler", "--preload", "xd_dask.dashboard.preload"]
    assert cluster["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == "xdtest"
    # GPU workers join the job's cluster (named after the job)
    assert gpu["spec"]["cluster"] == "xdtest"
    assert gpu["spec"]["worker"]["replicas"] == 2
    gc = gpu["spec"]["worker"]["spec"]["containers"][0]
    assert gc["args"][:3] == ["dask", "cuda", "worker"] and "GPU=1" in gc["args"]
    assert gc["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_gpu_fit_with_cpu_workers_is_refused():
    over = dict(BASE, **{"cluster.gpu": True})
    with pytest.raises(ConfigError, match="every worker needs a GPU"):
        render_job(load_config(overrides=over, environ={}), "kubernetes")
    over = dict(BASE, **{"deploy.n_workers": 0, "deploy.gpu_workers": 3})
    docs = list(
        yaml.safe_load_all(render_job(load_config(overrides=over, environ={}), "kubernetes"))
    )
    assert tomllib.loads(docs[0]["data"]["job.toml"])["cluster"]["gpu"] is True
    assert docs[1]["spec"]["cluster"]["spec"]["worker"]["replicas"] == 0


def test_render_job_cli(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[catalog]\npath = "/data/gaia"\n[deploy]\nn_workers = 3\nworker_cores = 2\n')
    runner = CliRunner()
    res = runner.invoke(main, ["render-job", "--target", "kubernetes", str(job), "-k", "32"])
    assert res.exit_code == 0, res.output
    docs = list(yaml.safe_load_all(res.output))
    assert docs[1]["spec"]["cluster"]["spec"]["worker"]["replicas"] == 3
    assert tomllib.loads(docs[0]["data"]["job.toml"])["fit"]["n_components"] == 32
    res = runner.invoke(
        main, ["render-job", "--target", "slurm", str(job), "--set", "deploy.walltime=1h"]
    )
    assert res.exit_code == 2
    assert "deploy.walltime must be HH:MM:SS" in res.output
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    res = runner.invoke(main, ["render-job", "--target", "slurm", str(empty)])
    assert res.exit_code == 2 and "catalog.path is not set" in res.output


GPU = {"deploy.n_workers": 0, "deploy.gpu_workers": 8, "deploy.slurm.gpu_partition": "gpu"}


@pytest.mark.parametrize(
    ("target", "overrides", "example"),
    [
        ("slurm", {}, "deploy/slurm/gaia-dr3-k256.sbatch"),
        ("slurm", GPU, "deploy/slurm/gaia-dr3-k256-gpu.sbatch"),
        ("kubernetes", {}, "deploy/kubernetes/gaia-dr3-k256.yaml"),
        ("kubernetes", GPU, "deploy/kubernetes/gaia-dr3-k256-gpu.yaml"),
    ],
)
def test_shipped_deploy_examples_are_what_render_job_generates(
    monkeypatch, target, overrides, example
):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    cfg = load_config("jobs/gaia-dr3-k256.toml", overrides, environ={})
    assert (repo / example).read_text() == render_job(cfg, target)


def test_kubernetes_sizes_follow_the_plots_and_state_the_claim_mode():
    """The runner pod's memory grows with plots.n_samples (1 GiB + 7 features x (160 B x n +
    32 B x 50000 rows), in 256 MiB steps); the header says the claim must be ReadWriteMany."""
    over = dict(BASE, **{"deploy.kubernetes.volume_claim": "gaia-pvc"})
    for n, want in [(50_000, "1280Mi"), (1_000_000, "2304Mi"), (4_000_000, "5376Mi")]:
        text = render_job(
            load_config(overrides=over | {"plots.n_samples": n}, environ={}), "kubernetes"
        )
        runner = list(yaml.safe_load_all(text))[1]["spec"]["job"]["spec"]["containers"][0]
        assert runner["resources"]["requests"]["memory"] == want, n
    assert "'gaia-pvc'" in text and "must be ReadWriteMany" in text.split("apiVersion")[0]
    text = render_job(load_config(overrides=BASE, environ={}), "kubernetes")
    assert "No volume claim" in text.split("apiVersion")[0]

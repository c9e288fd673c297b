"""The Kubernetes deployment (dask-kubernetes operator) of a job configuration.

A ConfigMap holding the job file, a ``DaskJob`` whose runner pod runs ``xd-dask fit`` (the
operator injects ``DASK_SCHEDULER_ADDRESS``) and whose cluster has the CPU worker group, and a
``DaskWorkerGroup`` of GPU workers joined to it, as one multi-document YAML string
(:func:`render_kubernetes`, also importable from :mod:`xd_dask.jobs.render`).
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

import yaml

from xd_dask.jobs.config import ConfigError, JobConfig
from xd_dask.jobs.deploy import dask_limit, mib, provenance, runner_mib, runtime_config

__all__ = ["render_kubernetes"]


def _k8s_mem(text: str) -> str:
    return f"{mib(text)}Mi"


_K8S_JOB_NAME = re.compile(r"[a-z]([a-z0-9-]{0,38}[a-z0-9])?")


def _check_kubernetes(cfg: JobConfig) -> None:
    dep = cfg["deploy"]
    if not _K8S_JOB_NAME.fullmatch(dep["name"]):
        raise ConfigError(
            f"deploy.name must be a Kubernetes name for --target kubernetes: a-z 0-9 -, starting "
            f"with a letter, at most 40 characters (the operator derives longer names from it), "
            f"got {dep['name']!r}"
        )
    for key in ("deploy.config_path", "deploy.kubernetes.mount_path"):
        if not posixpath.isabs(cfg.get(key)):
            raise ConfigError(f"{key} must be an absolute path, got {cfg.get(key)!r}")


def _volumes(cfg: JobConfig) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts) for the data volume claim, if configured."""
    k8s = cfg["deploy"]["kubernetes"]
    if not k8s["volume_claim"]:
        return [], []
    return (
        [{"name": "data", "persistentVolumeClaim": {"claimName": k8s["volume_claim"]}}],
        [{"name": "data", "mountPath": k8s["mount_path"]}],
    )


def _worker_container(cfg: JobConfig, gpu: bool) -> dict[str, Any]:
    dep = cfg["deploy"]
    cores, mem = dep["worker_cores"], _k8s_mem(dep["worker_memory"])
    args = ["dask", "cuda", "worker"] if gpu else ["dask", "worker"]
    args += [
        "--name", "$(DASK_WORKER_NAME)",
        "--nthreads", str(cores),
        "--memory-limit", dask_limit(dep["worker_memory"]),
        "--dashboard-address", "8788",
    ]  # fmt: skip
    limits: dict[str, Any] = {"cpu": str(cores), "memory": mem}
    if gpu:
        args += ["--resources", "GPU=1"]
        # a string: dask-kubernetes' CRDs type every resource quantity as a string, and the API
        # server refuses the integer 1 there (tests/test_deploy_kubernetes.py)
        limits["nvidia.com/gpu"] = "1"
    container: dict[str, Any] = {
        "name": "worker",
        "image": dep["gpu_image"] if gpu else dep["image"],
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "resources": {"requests": {"cpu": str(cores), "memory": mem}, "limits": limits},
        "ports": [{"name": "http-dashboard", "containerPort": 8788, "protocol": "TCP"}],
    }
    _, mounts = _volumes(cfg)
    if mounts:
        container["volumeMounts"] = mounts
    return container


class _Dumper(yaml.SafeDumper):
    """YAML without anchors/aliases, multi-line strings as literal blocks (readable TOML)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)


def _yaml_dump_all(docs: list[dict[str, Any]]) -> str:
    """The documents as YAML (:class:`_Dumper`: no aliases, TOML text as literal blocks)."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def render_kubernetes(cfg: JobConfig) -> str:
    """ConfigMap + DaskJob (+ GPU DaskWorkerGroup) as a multi-document YAML string."""
    run_cfg = runtime_config(cfg)
    _check_kubernetes(cfg)
    dep = cfg["deploy"]
    cfg_dir, cfg_file = posixpath.split(dep["config_path"])
    if not cfg_dir or not cfg_file:
        raise ConfigError(
            f"deploy.config_path must be an absolute file path, got {dep['config_path']!r}"
        )
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{dep['name']}-config", "namespace": dep["kubernetes"]["namespace"]},
        "data": {cfg_file: run_cfg.to_toml()},
    }
    docs: list[dict[str, Any]] = [config_map, _dask_job(cfg, run_cfg, cfg_dir)]
    if dep["gpu_workers"] > 0:
        docs.append(_gpu_worker_group(cfg))
    return _header(cfg) + _yaml_dump_all(docs)


def _job_container(cfg: JobConfig, run_cfg: JobConfig, cfg_dir: str) -> dict[str, Any]:
    """The runner pod's container: ``xd-dask fit`` on the job file the ConfigMap mounts."""
    dep = cfg["deploy"]
    _, mounts = _volumes(cfg)
    return {
        "name": "job",
        "image": dep["gpu_image"] if run_cfg.get("cluster.gpu") else dep["image"],
        "imagePullPolicy": "IfNotPresent",
        # DASK_SCHEDULER_ADDRESS is injected by the operator; xd-dask connects to it.
        "args": ["xd-dask", "fit", dep["config_path"], "--log-format", "json"],
        "volumeMounts": [{"name": "job-config", "mountPath": cfg_dir, "readOnly": True}, *mounts],
        # plots.n_samples model samples are drawn here (see runner_mib)
        "resources": {"requests": {"cpu": "1", "memory": f"{runner_mib(run_cfg)}Mi"}},
    }


def _scheduler_container(dep: dict[str, Any]) -> dict[str, Any]:
    """``dask scheduler`` with the XD dashboard preload, its ports, probes and resources."""
    resources = {"cpu": str(dep["scheduler_cores"]), "memory": _k8s_mem(dep["scheduler_memory"])}
    return {
        "name": "scheduler",
        "image": dep["image"],
        "imagePullPolicy": "IfNotPresent",
        # the preload serves the XD fit page (/xd) and the xd_dask_* metrics (/metrics)
        "args": ["dask", "scheduler", "--preload", "xd_dask.dashboard.preload"],
        "ports": [
            {"name": "tcp-comm", "containerPort": 8786, "protocol": "TCP"},
            {"name": "http-dashboard", "containerPort": 8787, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"port": "http-dashboard", "path": "/health"},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
        },
        "livenessProbe": {
            "httpGet": {"port": "http-dashboard", "path": "/health"},
            "initialDelaySeconds": 15,
            "periodSeconds": 20,
        },
        "resources": {"requests": dict(resources), "limits": dict(resources)},
    }


def _scheduler_service(name: str) -> dict[str, Any]:
    """The scheduler's ClusterIP service: its comm and dashboard ports."""
    return {
        "type": "ClusterIP",
        "selector": {"dask.org/cluster-name": name, "dask.org/component": "scheduler"},
        "ports": [
            {"name": "tcp-comm", "protocol": "TCP", "port": 8786, "targetPort": "tcp-comm"},
            {
                "name": "http-dashboard",
                "protocol": "TCP",
                "port": 8787,
                "targetPort": "http-dashboard",
            },
        ],
    }


def _worker_spec(cfg: JobConfig, gpu: bool) -> dict[str, Any]:
    """A worker group's pod spec: the worker container and the data volume, if any."""
    spec: dict[str, Any] = {"containers": [_worker_container(cfg, gpu=gpu)]}
    volumes, _ = _volumes(cfg)
    if volumes:
        spec["volumes"] = volumes
    return spec


def _dask_job(cfg: JobConfig, run_cfg: JobConfig, cfg_dir: str) -> dict[str, Any]:
    """The DaskJob: the runner pod, and the cluster with the scheduler and the CPU workers."""
    dep = cfg["deploy"]
    name = dep["name"]
    volumes, _ = _volumes(cfg)
    job_container = _job_container(cfg, run_cfg, cfg_dir)
    scheduler_container = _scheduler_container(dep)
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskJob",
        "metadata": {"name": name, "namespace": dep["kubernetes"]["namespace"]},
        "spec": {
            "job": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [job_container],
                    "volumes": [
                        {"name": "job-config", "configMap": {"name": f"{name}-config"}},
                        *volumes,
                    ],
                }
            },
            "cluster": {
                "spec": {
                    "worker": {"replicas": dep["n_workers"], "spec": _worker_spec(cfg, gpu=False)},
                    "scheduler": {
                        "spec": {"containers": [scheduler_container]},
                        "service": _scheduler_service(name),
                    },
                }
            },
        },
    }


def _gpu_worker_group(cfg: JobConfig) -> dict[str, Any]:
    """The DaskWorkerGroup of GPU workers; the DaskJob's cluster is named after the job."""
    dep = cfg["deploy"]
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskWorkerGroup",
        "metadata": {"name": f"{dep['name']}-gpu", "namespace": dep["kubernetes"]["namespace"]},
        "spec": {
            "cluster": dep["name"],
            "worker": {"replicas": dep["gpu_workers"], "spec": _worker_spec(cfg, gpu=True)},
        },
    }


def _header(cfg: JobConfig) -> str:
    """The comment lines above the manifests: provenance, how to apply, storage, memory."""
    dep = cfg["deploy"]
    claim = dep["kubernetes"]["volume_claim"]
    storage = (
        f"# The PersistentVolumeClaim {claim!r} is mounted by the runner and every worker pod at\n"
        "# once, on any node: it must be ReadWriteMany (e.g. NFS, CephFS, a cloud file store).\n"
        if claim
        else "# No volume claim (deploy.kubernetes.volume_claim): catalog.path and output.dir\n"
        "# must be object-store URLs every pod can reach, or the outputs are lost with the pods.\n"
    )
    return (
        f"# Generated by `xd-dask render-job --target kubernetes` {provenance(cfg)}.\n"
        "# Apply with: kubectl apply -f <this file> (needs the dask-kubernetes operator)\n"
        + storage
        + f"# Workers: --memory-limit {dask_limit(dep['worker_memory'])} = 90 % of their "
        f"{_k8s_mem(dep['worker_memory'])} limit.\n"
    )

"""Connecting to a Dask cluster: given scheduler, scheduler file, environment, or a local one.

Precedence: ``scheduler_address`` > ``scheduler_file`` > ``DASK_SCHEDULER_ADDRESS`` > a new
``LocalCluster`` with worker processes (``dask_cuda.LocalCUDACluster`` when ``gpu=True``).
CuPy and dask-cuda are imported only when ``gpu=True``.

A local cluster listens on the loopback interface only: its scheduler, workers and nannies on
``host`` (default 127.0.0.1), its dashboard on ``dashboard_address`` whose host defaults to the
same (``":8787"`` means ``"127.0.0.1:8787"``; the default, ``cluster.dashboard_address`` of the key
table, is a free port on loopback: no default asks for a fixed port, the logged link is the one
bound). ``dashboard_address="0.0.0.0:8787"`` opens the
dashboard to the network; ``host="0.0.0.0"`` opens the scheduler as well. Its scheduler runs the
XD dashboard preload (:data:`xd_dask.dashboard.PRELOAD`: the XD page at ``/xd`` and the
``xd_dask_*`` metrics on ``/metrics``); :func:`connect` logs the page's link.

Start time (``benchmarks/bench_start.py`` prints it). Dask starts each worker process by
"spawn": a fresh interpreter that imports ``distributed`` (and re-runs the client's ``__main__``
module's imports, the whole CLI for ``xd-dask``), then, at its first task, NumPy, pandas,
pyarrow, Numba and xd-dask's worker modules. A local cluster here starts its workers from a
fork server instead (Dask's ``distributed.worker.multiprocessing-method = "forkserver"``, the
method Dask's own test suite uses): one process imports those modules once (:data:`WORKER_MODULES`)
and forks every worker from itself, each starting with them loaded. It is started first, with
the environment Dask gives a new worker (``distributed.nanny.pre-spawn-environ``: one BLAS/OpenMP
thread, malloc trimming), so its imports run while the scheduler starts in this process. What is
left is Dask's own: the scheduler with its dashboard (Bokeh), each worker's start and
registration. Where ``forkserver`` is unavailable (Windows), or with ``gpu=True``
(``LocalCUDACluster``: CUDA does not survive a fork), workers start as Dask's configuration says.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
from collections.abc import Iterator
from typing import Any

import dask
from distributed import Client, LocalCluster

from xd_dask.config import key
from xd_dask.dashboard import PRELOAD
from xd_dask.dashboard.links import page_link
from xd_dask.distributed.gpu import GPUUnavailableError, device_info, require_gpu
from xd_dask.optim.kmeans_sample import warm_up
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["GPUUnavailableError", "check_gpu_workers", "connect", "worker_threads"]

LOOPBACK = "127.0.0.1"
#: A new local cluster's dashboard unless given (the key table's default: a free port).
DASHBOARD_ADDRESS: str = key("cluster.dashboard_address").default
#: How a new local cluster (CPU) starts its workers (module docstring); None: as Dask's
#: configuration says (``distributed.worker.multiprocessing-method``, "spawn" by default).
START_METHOD: str | None = "forkserver"
#: What the fork server imports before it forks workers: Dask's own fork-server list
#: (distributed, its dependencies, NumPy, pandas) and what every xd-dask worker needs at its first
#: task (:mod:`xd_dask.distributed.worker_preload`: the worker modules, Numba's CPU target).
WORKER_MODULES = (
    "distributed",
    "dask",
    "cloudpickle",
    "msgpack",
    "numpy",
    "pandas",
    "scipy.linalg",
    "xd_dask.distributed.worker_preload",
)


def check_gpu_workers(client: Client) -> dict[str, dict[str, Any]]:
    """Check that every worker of ``client`` can run the GPU kernels (CuPy, a CUDA device and
    numba.cuda, see :func:`xd_dask.distributed.gpu.device_info`); return each worker's device
    info, or raise GPUUnavailableError naming the workers that cannot, with their reasons."""
    infos = client.run(device_info)
    if not infos:
        raise GPUUnavailableError("gpu=True but the cluster has no workers")
    bad = {w: i["reason"] for w, i in sorted(infos.items()) if not i["ok"]}
    if bad:
        detail = "; ".join(f"{w}: {why}" for w, why in bad.items())
        raise GPUUnavailableError(f"gpu=True but {len(bad)} worker(s) have no usable GPU: {detail}")
    return infos


def worker_threads(client: Client) -> int:
    """Total worker threads of the cluster (at least 1)."""
    return max(1, sum(client.nthreads().values()))


def _loopback(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Local-cluster keywords with every listener on ``host`` (127.0.0.1 unless given)."""
    out = dict(kwargs)
    host = out.setdefault("host", LOOPBACK)
    dash = out.get("dashboard_address", DASHBOARD_ADDRESS)
    if not dash:  # no dashboard; the scheduler's HTTP server (health, /metrics) listens anyway:
        # on a free port (Dask's None would bind its default 8787, failing when that is taken)
        out["dashboard_address"] = f"{host}:0"
        out["scheduler_kwargs"] = {**(out.get("scheduler_kwargs") or {}), "dashboard": False}
    elif str(dash).startswith(":"):
        out["dashboard_address"] = f"{host}{dash}"
    else:
        out["dashboard_address"] = str(dash)
    return out


def _with_preload(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Local-cluster keywords whose scheduler also runs the XD dashboard preload."""
    out = dict(kwargs)
    sched = dict(out.get("scheduler_kwargs") or {})
    preload = sched.get("preload") or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    sched["preload"] = preload if PRELOAD in preload else [*preload, PRELOAD]
    out["scheduler_kwargs"] = sched
    return out


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` inside the block, restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fork_server_method() -> str | None:
    """Start the fork server that local workers are forked from (:data:`WORKER_MODULES`
    imported, Dask's pre-spawn environment) unless it runs already; return the start method
    for Dask's ``distributed.worker.multiprocessing-method`` ("forkserver"), or None where there
    is none (:data:`START_METHOD` None, no fork server on this platform)."""
    if START_METHOD != "forkserver" or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    from multiprocessing import forkserver  # noqa: PLC0415 - POSIX only: where it exists

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(WORKER_MODULES))
    env = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    with _environ({str(k): str(v) for k, v in env.items()}):
        forkserver.ensure_running()  # returns at once: the server imports while we go on
    return "forkserver"


def _log_xd_page(client: Client) -> None:
    link = page_link(client)
    if link:
        log.info("XD fit page: %s", link)


def connect(
    scheduler_address: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    gpu: bool = False,
    **cluster_kwargs: Any,
) -> tuple[Client, Any]:
    """Connect to a cluster, or start a local one.

    Parameters
    ----------
    scheduler_address : "tcp://host:port" of a running scheduler.
    scheduler_file : JSON file written by ``dask scheduler --scheduler-file``.
    n_workers : workers of a new local cluster (default: one per core / threads_per_worker, or
        one per GPU).
    threads_per_worker : threads of each local worker (default 1: the numerical kernels are
        single-threaded inside tasks, parallelism comes from worker processes).
    gpu : start ``dask_cuda.LocalCUDACluster`` (local), or check that the given workers have a GPU.
    **cluster_kwargs : passed to the local cluster (e.g. ``memory_limit``); ``host`` (default
        "127.0.0.1") is where its scheduler and workers listen, ``dashboard_address`` (default
        ``cluster.dashboard_address``: a free port on loopback; a port without a host means that
        port on ``host``; "" or None: no dashboard) where its dashboard does.

    Returns
    -------
    client : distributed.Client
    cluster : the local cluster this call started (close it after the client), or None.
    """
    address = scheduler_address
    if address is None and scheduler_file is None:
        address = os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    _warm_client_loops()
    if address is not None or scheduler_file is not None:
        return _connect_running(address, scheduler_file, gpu), None
    cluster_kwargs = _with_preload(_loopback(cluster_kwargs))
    if gpu:
        cluster = _start_local_cuda(n_workers, threads_per_worker, cluster_kwargs)
    else:
        cluster = _start_local_cpu(n_workers, threads_per_worker, cluster_kwargs)
    client = Client(cluster)
    log.info(
        "started %s with %d workers x %d threads; dashboard: %s",
        type(cluster).__name__,
        len(cluster.workers),
        threads_per_worker,
        client.dashboard_link,
    )
    _log_xd_page(client)
    return client, cluster


def _warm_client_loops() -> None:
    """Load the client's compiled k-means loops in a thread while the cluster starts or the
    client connects (:func:`xd_dask.optim.kmeans_sample.warm_up`: ~0.35 s of Numba set-up that
    a small table's start would otherwise wait for). Not a daemon: interpreter exit waits for
    it rather than stopping it inside the compiler."""
    threading.Thread(target=warm_up, name="xd-dask-warm-up").start()


def _connect_running(address: str | None, scheduler_file: str | None, gpu: bool) -> Client:
    """A client of the running scheduler at ``address`` (else the one ``scheduler_file`` names);
    with ``gpu`` its workers are checked (:func:`check_gpu_workers`; closed if they fail)."""
    client = (
        Client(address, scheduler_file=scheduler_file)
        if address
        else Client(scheduler_file=scheduler_file)
    )
    if gpu:
        try:
            check_gpu_workers(client)
        except GPUUnavailableError:
            client.close()
            raise
    log.info("connected to %s; dashboard: %s", client.scheduler.address, client.dashboard_link)
    _log_xd_page(client)
    return client


def _start_local_cuda(
    n_workers: int | None, threads_per_worker: int, kwargs: dict[str, Any]
) -> Any:
    """A new ``dask_cuda.LocalCUDACluster`` (CuPy and a device checked first)."""
    require_gpu()
    try:
        from dask_cuda import LocalCUDACluster  # noqa: PLC0415 - optional (xd-dask[gpu])
    except ImportError as exc:
        raise GPUUnavailableError(f"gpu=True needs dask-cuda: {exc}") from None
    return LocalCUDACluster(n_workers=n_workers, threads_per_worker=threads_per_worker, **kwargs)


def _start_local_cpu(
    n_workers: int | None, threads_per_worker: int, kwargs: dict[str, Any]
) -> LocalCluster:
    """A new ``LocalCluster`` of worker processes (default: one per core / threads_per_worker),
    forked from the fork server where there is one (:func:`fork_server_method`)."""
    if n_workers is None:
        n_workers = max(1, (os.cpu_count() or 1) // max(1, threads_per_worker))
    method = fork_server_method()
    config = {} if method is None else {"distributed.worker.multiprocessing-method": method}
    with dask.config.set(config):
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            **kwargs,
        )

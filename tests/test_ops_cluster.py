"""Operations against real clusters (issue 10, points 3 and 6).

- a running `xd-dask fit` (a real process on its own default local cluster) listens on
  127.0.0.1 only, prints its real dashboard link, and holds its output directory: a second
  `fit` into it exits 2 naming the first;
- deploy/local/cluster.sh listens on 127.0.0.1 only while a fit runs against it;
- `resume` refuses a catalogue whose values changed (exit 2, naming the file);
- posterior output replaces the directory as a whole (no stale part files), refuses foreign
  directories and a second writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.distributed_data import FEATURES, make_rows, schema, write_catalog
from tests.mixtures import known_mixture_3d
from xd_dask.cli import main
from xd_dask.distributed import posterior_catalog
from xd_dask.io import make_catalog
from xd_dask.locks import LockError
from xd_dask.model import XDModel
from xd_dask.params import Params
from xd_dask.utils import OutputError

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XD_DASK_")}
    if "XD_DASK_KERNEL_CACHE" in os.environ:
        env["XD_DASK_KERNEL_CACHE"] = os.environ["XD_DASK_KERNEL_CACHE"]
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env | extra


def _listening(pids) -> set[tuple[str, int]]:
    """(ip, port) of every listening TCP socket of the processes ``pids`` and their children."""
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    found = set()
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def _wait(predicate, what: str, timeout: float = 120.0, proc=None) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended while waiting for {what}")
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def gaia(tmp_path_factory):
    """A small Gaia-like catalogue, rewritten with column statistics for every column."""
    root = tmp_path_factory.mktemp("ops-cluster")
    make_catalog(root / "catalog", n_rows=4000, n_partitions=2, seed=11)
    for f in (root / "catalog").glob("*.parquet"):
        pq.write_table(pq.read_table(f), f)
    return root / "catalog"


def _job(path: Path, catalog: Path, **fit) -> Path:
    lines = "".join(f"{k} = {v}\n" for k, v in fit.items())
    path.write_text(
        f'[catalog]\npath = "{catalog}"\n[fit]\nn_components = 2\n{lines}[output]\nplots = false\n'
    )
    return path


def test_a_running_fit_listens_on_loopback_and_locks_its_output(gaia, cluster, tmp_path):
    job = _job(tmp_path / "job.toml", gaia, max_iter=100000, tol=0.0)
    out, log = tmp_path / "out", tmp_path / "fit.log"
    with open(log, "w") as fh:
        first = subprocess.Popen(
            [str(BIN / "xd-dask"), "fit", str(job), "--out", str(out), "--n-workers", "1"],
            env=_env(PYTHONUNBUFFERED="1"),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        lock = out / ".xd-dask.lock"

        def fitting() -> bool:
            try:
                return json.loads(lock.read_text() or "{}").get("pid") == first.pid
            except (OSError, ValueError):
                return False

        _wait(fitting, "the first fit to hold its output directory", proc=first)

        def dashboard_link():
            return re.search(r"Dask dashboard: http://([\d.]+):(\d+)/status", log.read_text())

        # the lock is taken before the cluster starts; the link is printed once it is up
        _wait(lambda: dashboard_link() is not None, "the fit's dashboard link", proc=first)
        link = dashboard_link()
        sockets = _listening([first.pid])
        # scheduler, dashboard (in the fit process), nanny and worker (its children)
        assert len(sockets) >= 4, sockets
        assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets
        assert (link.group(1), int(link.group(2))) in sockets  # the printed link is real

        second = CliRunner().invoke(
            main,
            [
                "fit",
                str(job),
                "--out",
                str(out),
                "--scheduler-address",
                cluster.scheduler_address,
            ],
        )
        assert second.exit_code == 2, second.output
        (err,) = [ln for ln in second.output.splitlines() if ln.startswith("Error: ")]
        assert f"pid {first.pid}" in err and str(out) in err and "in use" in err
        assert first.poll() is None  # the first fit was not disturbed
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGTERM)
            try:
                first.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()


@contextlib.contextmanager
def _cluster_sh(tmp_path, dashboard: str):
    """A deploy/local/cluster.sh cluster of 1 worker on free ports, DASHBOARD_ADDRESS
    ``dashboard``: (its directory, the pids of its processes); stopped (and its processes, only
    those, killed) on exit."""
    cdir = tmp_path / "dask-local"
    env = _env(CLUSTER_DIR=str(cdir), SCHEDULER_PORT="0", WORKER_MEMORY="1GiB")
    env["DASHBOARD_ADDRESS"] = dashboard
    script = REPO / "deploy" / "local" / "cluster.sh"
    subprocess.run(["bash", str(script), "start", "1", "1"], env=env, check=True, timeout=180)
    pids = []
    try:
        for name in ("scheduler.pid", "workers.pid"):
            pids += [int(x) for x in (cdir / name).read_text().split()]
        yield cdir, pids
    finally:
        subprocess.run(["bash", str(script), "stop"], env=env, timeout=60, capture_output=True)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_cluster_sh_listens_on_loopback_while_a_fit_runs(gaia, tmp_path):
    from distributed import Client

    from xd_dask.cli.progress import _dashboard
    from xd_dask.jobs.config import load_config
    from xd_dask.jobs.runner import run_fit

    # a port alone (":0", any free one) means that port on SCHEDULER_HOST, loopback by default;
    # no test asks for a fixed port (cluster.sh's own default, :8787, may be taken)
    with _cluster_sh(tmp_path, ":0") as (cdir, pids):
        seen: list[set] = []
        cfg = load_config(_job(tmp_path / "job.toml", gaia, max_iter=3, tol=0.0), environ={})
        with Client(scheduler_file=str(cdir / "scheduler.json")) as client:
            run_fit(
                cfg,
                client,
                progress=lambda ev: seen.append(_listening(pids)),
                out_dir=tmp_path / "out",
            )
            dashboard = client.dashboard_link
            assert _dashboard(client) == dashboard
    assert len(seen) == 3
    sockets = set().union(*seen)
    assert len(sockets) >= 4, sockets  # scheduler, dashboard, nanny, worker
    assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets
    port = int(re.search(r":(\d+)/status", dashboard).group(1))
    assert ("127.0.0.1", port) in sockets


def test_cluster_sh_without_a_dashboard_listens_on_loopback_and_is_not_shown_one(tmp_path):
    """DASHBOARD_ADDRESS=none: the scheduler's HTTP server (/health, /metrics) listens on
    loopback on a free port, not on Dask's default 0.0.0.0:8787, and the fit's dashboard line
    says there is none (Dask's client would show a link to that server's 404 /status)."""
    from distributed import Client

    from xd_dask.cli.progress import _dashboard

    with _cluster_sh(tmp_path, "none") as (cdir, pids):
        sockets = _listening(pids)
        with Client(scheduler_file=str(cdir / "scheduler.json")) as client:
            assert _dashboard(client) is None
    assert len(sockets) >= 4, sockets  # scheduler, its HTTP server, nanny, worker
    assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets
    assert ("127.0.0.1", 8787) not in sockets


def test_cluster_sh_gives_up_as_soon_as_its_scheduler_exits(tmp_path):
    """The scheduler cannot listen (its port is held here): `cluster.sh start` says so and exits
    1 once the scheduler process has ended (it waited the full 60 s for the scheduler file
    before), and no worker it started is left running (they start beside the scheduler)."""
    cdir = tmp_path / "dask-local"
    script = REPO / "deploy" / "local" / "cluster.sh"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = _env(CLUSTER_DIR=str(cdir), SCHEDULER_PORT=str(port), WORKER_MEMORY="1GiB")
        env["DASHBOARD_ADDRESS"] = "none"
        t0 = time.monotonic()
        proc = subprocess.run(
            ["bash", str(script), "start", "2", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "dask scheduler did not start" in proc.stderr and "scheduler.log" in proc.stderr
    assert took < 30, took  # the scheduler's own start and exit take a few seconds
    assert "address already in use" in (cdir / "scheduler.log").read_text().lower()
    assert not (cdir / "workers.pid").exists() and not (cdir / "scheduler.pid").exists()
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(cdir) in " ".join(p.info["cmdline"] or [])
    ]


def test_resume_refuses_a_catalogue_whose_values_changed(gaia, cluster, tmp_path):
    import shutil

    cat = tmp_path / "catalog"
    shutil.copytree(gaia, cat)
    job = _job(tmp_path / "job.toml", cat, max_iter=2, tol=0.0)
    out = tmp_path / "out"
    addr = ["--scheduler-address", cluster.scheduler_address]
    runner = CliRunner()
    res = runner.invoke(main, ["fit", str(job), "--out", str(out), *addr])
    assert res.exit_code == 0, res.output
    stale = out / "checkpoints" / ".checkpoint.npz.k1ll3d.npz.tmp"  # a killed checkpoint write
    stale.write_bytes(b"partial")
    assert runner.invoke(main, ["resume", str(out), *addr]).exit_code == 0  # unchanged: fine
    assert not stale.exists()  # removed under the output lock
    victim = sorted(cat.glob("*.parquet"))[1]
    table = pq.read_table(victim)
    i = table.schema.get_field_index("parallax")
    table = table.set_column(i, "parallax", pa.array(table["parallax"].to_numpy() * 1.5))
    pq.write_table(table, victim)  # same rows and row groups, other values
    res = runner.invoke(main, ["resume", str(out), *addr])
    assert res.exit_code == 2, res.output
    (err,) = [ln for ln in res.output.splitlines() if ln.startswith("Error: ")]
    assert str(victim) in err and "footer changed" in err
    other = sorted(cat.glob("*.parquet"))[0]
    assert str(other) not in err


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    X, S = make_rows(seed=9, n=300)
    cat = tmp_path_factory.mktemp("plain") / "cat"
    write_catalog(cat, X, S, 3)
    w, m, V = known_mixture_3d()
    return cat, XDModel(Params(w, m, V), FEATURES)


def test_posterior_output_is_replaced_as_a_whole(plain, client, tmp_path):
    cat, model = plain
    out = tmp_path / "post"
    files = posterior_catalog(model, cat, schema(), client, out)
    assert [Path(f).name for f in files] == [f"posterior-{i:06d}.parquet" for i in range(3)]
    first = pq.read_table(out)
    # an earlier run over more partitions left a part file; a killed one left a temporary
    pq.write_table(pq.read_table(files[0]), out / "posterior-000007.parquet")
    stale_tmp = tmp_path / ".post.x1y2z3.tmp"
    stale_tmp.mkdir()
    posterior_catalog(model, cat, schema(), client, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["_SUCCESS.json"] + [f"posterior-{i:06d}.parquet" for i in range(3)]
    again = pq.read_table(out)
    assert again.num_rows == 300 and again.equals(first)
    assert not stale_tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["post"]  # its lock file is gone too


def test_posterior_refuses_a_foreign_directory_and_a_second_writer(plain, client, tmp_path):
    cat, model = plain
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="thesis.tex"):
        posterior_catalog(model, cat, schema(), client, mine)
    assert (mine / "thesis.tex").read_text() == "precious"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys, time
                from xd_dask.locks import FileLock
                FileLock(sys.argv[1]).acquire()
                print("locked", flush=True)
                time.sleep(60)
                """
            ),
            str(tmp_path / ".post.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match=f"pid {holder.pid}"):
            posterior_catalog(model, cat, schema(), client, tmp_path / "post")
        assert not (tmp_path / "post").exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    np.testing.assert_equal(
        len(posterior_catalog(model, cat, schema(), client, tmp_path / "post")), 3
    )


def test_a_local_cluster_asks_for_no_fixed_dashboard_port():
    """connect()'s default dashboard is a free port on loopback (the key table's
    cluster.dashboard_address), so another dashboard on 8787 costs nothing: no "Port 8787 is
    already in use" warning (an error under this suite's filterwarnings), a link that is real."""
    import socket

    from xd_dask.distributed import connect

    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 8787))  # taken by this test, or by someone else already
        holder.listen()
    except OSError:
        pass
    try:
        client, cluster = connect(n_workers=1)
        try:
            link = cluster.dashboard_link
            port = int(re.search(r":(\d+)/status", link).group(1))
            assert port not in (8787, 0) and link.startswith("http://127.0.0.1:")
            assert client.scheduler_info()["services"]["dashboard"] == port
        finally:
            client.close()
            cluster.close()
    finally:
        holder.close()


@pytest.mark.cluster
def test_a_local_cluster_without_a_dashboard_needs_no_fixed_port():
    """connect(dashboard_address=None): no dashboard, and the scheduler's HTTP server (health,
    /metrics) on a free loopback port -- Dask's own None binds 8787, so a second cluster on the
    machine (another user's, a parallel test) made the start fail. 8787 is held here while the
    cluster starts."""
    import socket
    import urllib.error
    import urllib.request

    from xd_dask.distributed import connect

    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    try:
        held.bind(("127.0.0.1", 8787))
        held.listen(1)
    except OSError:  # taken already: the condition under test holds anyway
        pass
    try:
        client, cluster = connect(n_workers=1, dashboard_address=None)
        try:
            assert client.submit(sum, [1, 2]).result() == 3
            port = cluster.scheduler.http_server.port
            assert port != 8787
            base = f"http://127.0.0.1:{port}"
            assert urllib.request.urlopen(f"{base}/health", timeout=30).read() == b"ok"
            with pytest.raises(urllib.error.HTTPError) as no_page:
                urllib.request.urlopen(f"{base}/status", timeout=30)
            assert no_page.value.code == 404  # no dashboard was asked for
        finally:
            client.close()
            cluster.close()
    finally:
        held.close()

"""Lock files cannot be turned against the user (issue 19, point 2).

Real ``xd-dask`` processes against a real cluster: a symbolic link planted at the lock path of
``fit`` (``out/.xd-dask.lock``), ``posterior`` (``.post.lock``) and ``score --per-row``
(``.rows.lock``) must leave the file it points to untouched and stop the command (exit 2, naming
the link); a lock file that belongs to another user or has a second hard link is refused too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from xd_dask.io import make_catalog
from xd_dask.io.synthetic import TRUE_MODEL
from xd_dask.locks import FileLock, UnsafeFileError, is_locked

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PRECIOUS = "precious text that must survive\n" * 10


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XD_DASK_")}
    if "XD_DASK_KERNEL_CACHE" in os.environ:
        env["XD_DASK_KERNEL_CACHE"] = os.environ["XD_DASK_KERNEL_CACHE"]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _xd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "xd-dask"), *args], env=_env(), capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("locks")
    make_catalog(root / "catalog", n_rows=1000, n_partitions=2, seed=5)
    return root / "catalog"


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)
    return victim


def _refused(proc: subprocess.CompletedProcess, link: Path, victim: Path) -> None:
    assert victim.read_text() == PRECIOUS, "the file behind the planted link was written"
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{link} is a symbolic link" in proc.stderr, proc.stderr
    assert link.is_symlink()


def test_fit_does_not_truncate_what_a_planted_lock_link_points_to(catalog, cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = _victim(tmp_path)
    link = out / ".xd-dask.lock"
    link.symlink_to(victim)
    job = tmp_path / "job.toml"
    job.write_text(
        f'[catalog]\npath = "{catalog}"\n[fit]\nn_components = 2\nmax_iter = 2\n'
        "[output]\nplots = false\n"
    )
    proc = _xd("fit", str(job), "--out", str(out), "--scheduler-address", cluster.scheduler_address)
    _refused(proc, link, victim)
    assert not (out / "model.npz").exists()


def test_posterior_and_per_row_score_refuse_planted_lock_links(catalog, cluster, tmp_path):
    model = catalog / TRUE_MODEL
    victim = _victim(tmp_path)
    post_link = tmp_path / ".post.lock"
    post_link.symlink_to(victim)
    proc = _xd(
        "posterior",
        str(model),
        str(catalog),
        str(tmp_path / "post"),
        "--scheduler-address",
        cluster.scheduler_address,
    )
    _refused(proc, post_link, victim)
    assert not (tmp_path / "post").exists()

    rows_link = tmp_path / ".rows.lock"
    rows_link.symlink_to(victim)
    proc = _xd(
        "score",
        str(model),
        str(catalog),
        "--per-row",
        str(tmp_path / "rows"),
        "--scheduler-address",
        cluster.scheduler_address,
    )
    _refused(proc, rows_link, victim)
    assert not (tmp_path / "rows").exists()

    # the same commands succeed once the links are gone (and remove their lock files: nothing of
    # a run is left beside the output)
    post_link.unlink()
    proc = _xd(
        "posterior",
        str(model),
        str(catalog),
        str(tmp_path / "post"),
        "--scheduler-address",
        cluster.scheduler_address,
    )
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(tmp_path / "post").num_rows == 1000
    assert not post_link.exists() and not post_link.is_symlink()


def test_a_lock_file_of_another_user_or_with_a_second_link_is_refused(tmp_path):
    lock = tmp_path / ".xd-dask.lock"
    lock.write_text("")
    os.chown(lock, 65534, 65534)  # nobody's file (e.g. left in a shared directory)
    with pytest.raises(UnsafeFileError, match=r"owned by uid 65534"):
        FileLock(lock).acquire()
    lock.unlink()
    victim = _victim(tmp_path)
    os.link(victim, lock)  # a hard link: truncating the lock would truncate the victim
    with pytest.raises(UnsafeFileError, match="2 hard links"):
        FileLock(lock).acquire()
    assert victim.read_text() == PRECIOUS
    lock.unlink()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        FileLock(fifo).acquire()  # and does not block opening it
    lock.symlink_to(victim)
    assert not is_locked(lock)


def test_a_removed_lock_file_is_not_locked_twice(tmp_path):
    """A waiter that locks the file its holder removed on release retries on the file that is
    there now: never two holders (a new holder on the new file refuses the waiter)."""
    import threading
    import time

    from xd_dask.locks import LockError

    path = tmp_path / ".out.lock"
    first = FileLock(path, "output", remove=True).acquire()
    waiter = FileLock(path, "output", remove=True)
    got = threading.Event()
    t = threading.Thread(target=lambda: (waiter.acquire(timeout=20.0), got.set()), daemon=True)
    t.start()
    time.sleep(0.3)  # the waiter polls a descriptor of the first file
    first.release()  # removes the file
    try:
        third = FileLock(path, "output", remove=True).acquire()  # a new file
    except LockError:  # the waiter was quicker, on the new file: still one holder
        assert got.wait(5.0) and waiter.held
        waiter.release()
        return
    try:
        assert not got.wait(1.0)  # the waiter did not keep the removed file's lock
        assert not waiter.held
    finally:
        third.release()
    t.join(20.0)
    assert got.is_set() and waiter.held  # then it takes the new file's lock
    waiter.release()
    assert not path.exists()

"""Numba's cache files in the kernel cache cannot be planted (issue 19, point 3).

The cache directory passes the directory checks (this user's, mode 0755: others may read and
search it but not write it). The index (``__pycache__/*.nbi``) or data (``*.nbc``) files Numba
wrote there are left writable by others (as a umask of 0 makes them), and user ``nobody``, in a
real process, overwrites them with a pickle that creates a marker file when it is unpickled. The
next kernel run (a real process, as root) must not unpickle it: it discards the files, compiles
again and gets the right numbers. A file owned by ``nobody`` is discarded the same way.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.test_ops_kernel_cache import KERNEL_RUN

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534


class _Planted:
    """Unpickling this calls open(marker, "w"): the marker file proves the pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _run_kernel(cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, XD_DASK_KERNEL_CACHE=str(cache))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", KERNEL_RUN], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-10  # the right kernel ran
    return proc


def _as_nobody(code: str, *args: str) -> None:
    """Run Python ``code`` as user nobody (a real process with nobody's uid and gid)."""
    subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        + [sys.executable, "-I", "-c", code, *args],
        check=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "")},
    )


@pytest.fixture
def shared_cache():
    """A cache directory others can search (not write), outside the private pytest tree."""
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to act as another user")
    root = Path(tempfile.mkdtemp(prefix="xd-kcache-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root / "kernels"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("suffix", [".nbi", ".nbc"])
def test_numba_cache_files_others_could_write_are_never_unpickled(shared_cache, suffix):
    marker = shared_cache.parent / "marker"
    _run_kernel(shared_cache)  # populates the cache: modules and Numba's index and data files
    pycache = shared_cache / "__pycache__"
    targets = sorted(pycache.glob(f"*{suffix}"))
    assert targets, sorted(p.name for p in pycache.iterdir())
    for d in (shared_cache, pycache):
        d.chmod(0o755)  # still accepted: others can search, not write
    for f in targets:
        f.chmod(0o666)  # written under umask 0
    payload = tempfile.NamedTemporaryFile(dir=shared_cache.parent, delete=False)
    with payload:
        pickle.dump(_Planted(str(marker)), payload)
    os.chmod(payload.name, 0o644)
    _as_nobody(
        "import sys, shutil\nfor f in sys.argv[2:]:\n    shutil.copyfile(sys.argv[1], f)\n",
        payload.name,
        *map(str, targets),
    )
    assert all(f.read_bytes() == Path(payload.name).read_bytes() for f in targets)
    proc = _run_kernel(shared_cache)
    assert not marker.exists(), "a pickle written by another user was unpickled"
    assert "anyone could have written it: discarding it" in proc.stderr, proc.stderr
    # rebuilt by this run: this user's files again, not writable by others
    rebuilt = sorted(pycache.glob(f"*{suffix}"))
    assert rebuilt and all(f.stat().st_uid == os.geteuid() for f in rebuilt)
    assert all(f.read_bytes() != Path(payload.name).read_bytes() for f in rebuilt)


def test_numba_cache_files_owned_by_another_user_are_discarded(shared_cache):
    marker = shared_cache.parent / "marker"
    _run_kernel(shared_cache)
    pycache = shared_cache / "__pycache__"
    index = sorted(pycache.glob("*.nbi"))
    for f in index:
        f.write_bytes(pickle.dumps(_Planted(str(marker))))
        os.chown(f, NOBODY, NOBODY)  # mode 0644: only nobody could have written it
    proc = _run_kernel(shared_cache)
    assert not marker.exists()
    assert "owned by uid 65534" in proc.stderr, proc.stderr
    assert all(f.stat().st_uid == os.geteuid() for f in pycache.glob("*.nbi"))


def test_an_unsafe_numba_cache_dir_means_compiling_in_memory(tmp_path):
    """NUMBA_CACHE_DIR takes precedence over __pycache__; others may write it: not used."""
    shared = tmp_path / "numba-shared"
    shared.mkdir()
    shared.chmod(0o777)
    env_extra = {"NUMBA_CACHE_DIR": str(shared)}
    env = dict(os.environ, XD_DASK_KERNEL_CACHE=str(tmp_path / "kcache"), **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", KERNEL_RUN], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-10
    assert "Numba cache directory not safe" in proc.stderr, proc.stderr
    assert not any(p.suffix in (".nbi", ".nbc") for p in shared.rglob("*"))

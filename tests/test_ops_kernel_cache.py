"""The compiled-kernel cache refuses modules it did not write (issue 10, point 4).

A "planted" module is Python that creates a marker file when executed. It must never run: a
module whose text differs from the generated source is replaced (and the generated source is what
executes), and a cache directory that others can write to is not used at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from xd_dask.utils import kernel_cache_dir, load_generated_module

# A compiled kernel against the reference backend, in a fresh process using the cache in argv[1].
KERNEL_RUN = textwrap.dedent(
    """
    import numpy as np
    from xd_dask.kernels import row_log_likelihood
    from xd_dask.params import Params
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 2))
    S = np.broadcast_to(np.eye(2) * 0.1, (50, 2, 2)).copy()
    p = Params(np.array([0.5, 0.5]), rng.normal(size=(2, 2)), np.stack([np.eye(2)] * 2))
    a = row_log_likelihood(X, S, p, backend="numba")
    b = row_log_likelihood(X, S, p, backend="reference")
    print(float(np.abs(a - b).max()))
    """
)


def _planted(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('planted code ran')\nkernel = None\nbuild = None\n"


def _run_kernel(cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, XD_DASK_KERNEL_CACHE=str(cache))
    proc = subprocess.run(
        [sys.executable, "-c", KERNEL_RUN], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-10  # the right kernel ran
    return proc


def test_load_generated_module_never_executes_other_text(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "gen_mod.py"
    source = "# generated\nkernel = lambda x: x + 1\n"
    path.write_text(_planted(marker))
    mod = load_generated_module(path, "_xd_dask_test_planted_gen_mod", {}, source=source)
    try:
        assert mod.kernel(1) == 2 and not marker.exists()
        assert path.read_text() == source  # replaced atomically by the generated text
        assert mod.__file__ == str(path) and mod.kernel.__code__.co_filename == str(path)
    finally:
        sys.modules.pop("_xd_dask_test_planted_gen_mod", None)


def test_planted_modules_under_the_kernel_names_are_replaced_not_run(tmp_path):
    cache = tmp_path / "kcache"
    _run_kernel(cache)  # populates the cache with the generated modules
    modules = sorted(cache.rglob("*.py"))
    assert modules and not any(p.parent.name == "__pycache__" for p in modules)
    original = {p: p.read_text() for p in modules}
    marker = tmp_path / "marker"
    for p in modules:  # same names, other code (e.g. a stale kernel, or someone else's)
        p.write_text(_planted(marker))
    proc = _run_kernel(cache)
    assert not marker.exists()
    assert {p: p.read_text() for p in modules} == original
    assert "does not hold the code" in proc.stderr


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_a_cache_directory_others_can_write_is_not_used(tmp_path, mode):
    cache = tmp_path / "shared"
    cache.mkdir()
    marker = tmp_path / "marker"
    (cache / "anything.py").write_text(_planted(marker))
    cache.chmod(mode)
    env_cache = os.environ.get("XD_DASK_KERNEL_CACHE")
    os.environ["XD_DASK_KERNEL_CACHE"] = str(cache)
    try:
        assert kernel_cache_dir() is None
    finally:
        if env_cache is None:
            os.environ.pop("XD_DASK_KERNEL_CACHE")
        else:
            os.environ["XD_DASK_KERNEL_CACHE"] = env_cache
    proc = _run_kernel(cache)  # compiled in memory: right results, nothing written or run
    assert "writable by group or others" in proc.stderr
    assert not marker.exists() and sorted(p.name for p in cache.iterdir()) == ["anything.py"]


def test_new_cache_directories_are_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XD_DASK_KERNEL_CACHE", str(tmp_path / "new" / "kernels"))
    umask = os.umask(0o002)  # a umask that would make group-writable directories
    try:
        path = kernel_cache_dir("io")
    finally:
        os.umask(umask)
    assert path == tmp_path / "new" / "kernels" / "io"
    for p in (path, path.parent, path.parent.parent):
        assert p.stat().st_mode & 0o777 == 0o700, p

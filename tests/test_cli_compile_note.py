"""The first run compiles the kernels (issue 11, problem 9): the CLI says so when the kernel
cache holds no compiled kernel for the fit's D and dtype, and not once it does."""

from __future__ import annotations

import os
import subprocess
import sys

from xd_dask.cli.progress import Progress, compile_note, kernels_cold
from xd_dask.jobs.config import load_config

COMPILE = "from xd_dask.kernels import _numba; _numba._kernel('stats', 1, False)"


def test_compile_note_follows_the_real_kernel_cache(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "kernels"
    monkeypatch.setenv("XD_DASK_KERNEL_CACHE", str(cache))
    cfg = load_config(environ={})
    assert kernels_cold(1) and kernels_cold(7)
    compile_note(cfg, Progress("text"), 1)
    assert "Compiling the numerical kernels for D = 1 (float64)" in capsys.readouterr().out
    # compile the D = 1 kernel into that cache in another process, as a worker would
    env = dict(os.environ, XD_DASK_KERNEL_CACHE=str(cache))
    subprocess.run([sys.executable, "-c", COMPILE], env=env, check=True, timeout=300)
    assert not kernels_cold(1) and kernels_cold(1, "float32") and kernels_cold(2)
    compile_note(cfg, Progress("text"), 1)
    assert capsys.readouterr().out == ""
    # a cluster somewhere else: this machine's cache says nothing about its workers
    remote = cfg.replace({"cluster.scheduler_address": "tcp://10.0.0.1:8786"})
    compile_note(remote, Progress("text"), 7)
    assert capsys.readouterr().out == ""

"""GPU workers: device-resident partitions in the GPU kernels' layout, the worker check, and the
GPU batch EM against the CPU one.

On a CPU machine (CI) this tests what it can for real: the device layout built with NumPy as
the array module (the same code path as with CuPy), the kernels dispatcher on that layout,
``check_gpu_workers`` on a real two-process cluster (every worker reported, with its reason),
and the backend choice for CuPy rows. The tests marked ``gpu`` need CuPy, dask-cuda and a CUDA
device and are skipped cleanly without them; nothing is faked on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.distributed_data import make_rows, schema, write_catalog
from xd_dask.distributed.cluster import GPUUnavailableError, check_gpu_workers
from xd_dask.distributed.gpu import device_info, to_device
from xd_dask.kernels import compute_stats, posterior, registry
from xd_dask.params import Params

try:
    import cupy

    HAVE_DEVICE = bool(cupy.is_available())
except ImportError:
    cupy, HAVE_DEVICE = None, False


def test_device_layout_is_packed_and_in_the_row_dtype():
    X, S = make_rows(seed=1, n=50, missing=0.2)
    R = np.random.default_rng(0).normal(size=(50, 3, 3))
    Xd, Sd, Rd = to_device(X, S, R, dtype=np.float32, xp=np)
    assert Xd.dtype == Sd.dtype == Rd.dtype == np.float32
    assert Sd.shape == (50, 6) and Sd.flags.c_contiguous and Xd.flags.c_contiguous
    for a in range(3):
        for b in range(a + 1):  # entry (a, b) of the lower triangle at a (a + 1) / 2 + b
            np.testing.assert_array_equal(
                Sd[:, a * (a + 1) // 2 + b], S[:, a, b].astype(np.float32)
            )
    np.testing.assert_array_equal(np.isnan(Xd), np.isnan(X))


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_dispatcher_takes_the_packed_layout(backend):
    """Packed noise (missing fields: sub-triangles gathered per pattern) gives the statistics
    and posteriors of the full (n, D, D) noise, for backends that unpack it."""
    X, S = make_rows(seed=2, n=200, missing=0.3)
    w, m, V = np.array([0.5, 0.5]), np.array([[0.0, 0, 0], [5.0, 2, -3]]), np.stack([np.eye(3)] * 2)
    Xd, Sd, _ = to_device(X, S, xp=np)
    got = compute_stats(Xd, Sd, Params(w, m, V), backend=backend)
    want = compute_stats(X, S, Params(w, m, V), backend=backend)
    np.testing.assert_allclose(got.C, want.C, rtol=1e-13, atol=1e-13 * np.abs(want.C).max())
    assert got.ll == pytest.approx(want.ll, rel=1e-14)
    mean, cov = posterior(Xd, Sd, Params(w, m, V), backend=backend)
    mean0, cov0 = posterior(X, S, Params(w, m, V), backend=backend)
    np.testing.assert_allclose(mean, mean0, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(cov, cov0, rtol=1e-13, atol=1e-13)


def test_cuda_backend_is_auto_for_cupy_rows():
    for kernel in ("stats", "logdens", "posterior"):
        assert registry._accepts(kernel, "cuda", "cupy", True)
        assert not registry._accepts(kernel, "cuda", "numpy", False)
    assert registry.backend_names().index("cuda") < registry.backend_names().index("reference")
    from xd_dask.distributed.tasks import _resolved_backend

    assert _resolved_backend("auto", True) == "auto"  # the registry then picks "cuda" for CuPy
    with pytest.raises(ValueError, match="cannot run on GPU workers"):
        _resolved_backend("numba", True)


@pytest.mark.cluster
@pytest.mark.skipif(HAVE_DEVICE, reason="on a GPU machine the workers do have a device")
def test_check_gpu_workers_names_every_worker_and_why(client):
    with pytest.raises(GPUUnavailableError) as info:
        check_gpu_workers(client)
    msg = str(info.value)
    assert "2 worker(s) have no usable GPU" in msg
    for addr in client.scheduler_info()["workers"]:
        assert addr in msg
    assert ("CuPy is not installed" in msg) or ("no usable CUDA device" in msg)
    assert not device_info()["ok"] and device_info()["reason"]


# --------------------------------------------------------------------------- on a device
@pytest.mark.gpu
@pytest.mark.cluster
@pytest.mark.skipif(not HAVE_DEVICE, reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpu_batch_em_equals_cpu(tmp_path, dtype):
    pytest.importorskip("dask_cuda")
    from xd_dask.distributed import FitConfig, connect, fit_catalog

    X, S = make_rows(seed=9, n=3000, missing=0.05)
    write_catalog(tmp_path / "cat", X, S, 4)
    base = dict(
        catalog=str(tmp_path / "cat"), n_components=3, schema=schema(), max_iter=5, tol=0.0, seed=1
    )
    client, cluster = connect(gpu=True, n_workers=1)
    try:
        info = check_gpu_workers(client)
        assert all(i["ok"] for i in info.values())
        gpu = fit_catalog(FitConfig(**base, gpu=True, persist=True, dtype=dtype), client)
        cpu = fit_catalog(FitConfig(**base, backend="reference", dtype=dtype), client)
    finally:
        client.close()
        cluster.close()
    tol = 1e-8 if dtype == "float64" else 1e-4
    np.testing.assert_allclose(gpu.means, cpu.means, rtol=0, atol=tol * 10)
    np.testing.assert_allclose(gpu.covariances, cpu.covariances, rtol=0, atol=tol * 10)
    np.testing.assert_allclose(gpu.weights, cpu.weights, rtol=0, atol=tol)


@pytest.mark.parametrize(
    ("dtype", "gpu", "want"),
    [("auto", True, np.float32), ("auto", False, np.float64), ("float64", True, np.float64),
     ("float32", False, np.float32)],
)  # fmt: skip
def test_auto_row_dtype_is_float32_on_gpu_workers_only(tmp_path, monkeypatch, dtype, gpu, want):
    """fit.dtype = "auto" (the default): GPU workers hold float32 rows (issue 12), CPU workers
    float64; an explicit dtype wins. The device layout is built with NumPy standing in for CuPy
    (the same code path); the rows equal the float64 rows rounded once."""
    import xd_dask.distributed.gpu as gpu_mod
    from xd_dask.config import row_dtype
    from xd_dask.distributed import build_manifest
    from xd_dask.distributed.tasks import TaskOptions, read_block

    real = gpu_mod.to_device
    monkeypatch.setattr(gpu_mod, "to_device", lambda X, S, R=None: real(X, S, R, xp=np))
    X, S = make_rows(seed=3, n=40)
    write_catalog(tmp_path / "cat", X, S, 1)
    part = build_manifest(str(tmp_path / "cat"))[0]
    blk = read_block(part, TaskOptions(schema(), dtype=row_dtype(dtype, gpu), gpu=gpu))
    assert blk.X.dtype == want
    ref = read_block(part, TaskOptions(schema(), dtype="float64"))
    np.testing.assert_array_equal(blk.X, ref.X.astype(want))

"""GPU path of the distributed fit: partitions in CuPy on the workers, NumPy statistics back.

Skipped cleanly without CuPy, dask-cuda or a CUDA device; never faked on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.distributed_data import make_rows, schema, write_catalog
from xd_dask.distributed import FitConfig, connect, fit_catalog

cupy = pytest.importorskip("cupy")
pytest.importorskip("dask_cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.cluster,
    pytest.mark.skipif(not cupy.is_available(), reason="no CUDA device"),
]


def test_gpu_batch_em_equals_cpu(tmp_path):
    X, S = make_rows(seed=9, n=3000, missing=0.05)
    write_catalog(tmp_path / "cat", X, S, 4)
    base = dict(
        catalog=str(tmp_path / "cat"), n_components=3, schema=schema(), max_iter=5, tol=0.0, seed=1
    )
    client, cluster = connect(gpu=True, n_workers=1)
    try:
        gpu = fit_catalog(FitConfig(**base, gpu=True, persist=True), client)
        cpu = fit_catalog(FitConfig(**base, backend="reference"), client)
    finally:
        client.close()
        cluster.close()
    np.testing.assert_allclose(gpu.means, cpu.means, rtol=0, atol=1e-8)
    np.testing.assert_allclose(gpu.covariances, cpu.covariances, rtol=0, atol=1e-8)
    np.testing.assert_allclose(gpu.weights, cpu.weights, rtol=0, atol=1e-8)

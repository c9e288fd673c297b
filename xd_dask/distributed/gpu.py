"""Worker-side GPU support: partitions on the device, and what a GPU worker can do.

A GPU worker (``TaskOptions.gpu``) moves each partition it reads to its device ONCE
(:func:`to_device`, called by :func:`xd_dask.distributed.tasks.read_block`); with
``persist=True`` the :class:`~xd_dask.distributed.tasks.Block` then holds CuPy arrays between
iterations and every pass runs on them:

- ``X`` (n, D) in the fit's row dtype (``fit.dtype``; float32 halves the memory and is what
  the device is fast at, the statistics are summed in float64 either way);
- ``X_cov`` as PACKED lower triangles (n, D (D + 1) / 2) (entry (a, b), a >= b, at column
  a (a + 1) / 2 + b): half the bytes of (n, D, D), and the layout the CUDA kernels read;
- ``R`` (n, d, D) projections, when the schema has them.

The kernels dispatcher (:mod:`xd_dask.kernels`) takes these arrays as they are: "auto" picks
the ``cuda`` backend for CuPy input (the numba.cuda kernels of :mod:`xd_dask.kernels._cuda`,
compiled once per worker process and cached, launched on CuPy's current stream, which numba
reads through ``__cuda_array_interface__``), groups the rows by missingness pattern on the
device and brings only O(K D^2) sums back to the host. The reference kernel stays the oracle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["GPUUnavailableError", "device_info", "require_gpu", "to_device"]


class GPUUnavailableError(RuntimeError):
    """``gpu=True`` was asked for but CuPy, dask-cuda or a CUDA device is missing."""


def require_gpu() -> Any:
    """Import CuPy and check that a CUDA device is usable; return the cupy module."""
    try:
        import cupy  # noqa: PLC0415 - optional dependency, imported only when a GPU is asked for
    except ImportError as exc:
        raise GPUUnavailableError(
            f"gpu=True needs CuPy (pip install 'xd-dask[gpu]'): {exc}"
        ) from None
    if not cupy.is_available():
        raise GPUUnavailableError("gpu=True but CuPy finds no usable CUDA device")
    return cupy


def to_device(X: np.ndarray, X_cov: np.ndarray, R: np.ndarray | None = None,
              dtype: Any = None, xp: Any = None) -> tuple[Any, Any, Any]:  # fmt: skip
    """A partition's rows on the device in the layout of the GPU kernels.

    Parameters
    ----------
    X : (n, D) host array (NaN = missing); X_cov : (n, D, D); R : (n, d, D) or None.
    dtype : row dtype on the device (default: X's).
    xp : array module (default CuPy; NumPy gives the same layout on the host, for tests).

    Returns
    -------
    (X (n, D), X_cov packed (n, D (D + 1) / 2), R or None), C-contiguous device arrays of
    ``dtype``, copied on CuPy's current stream.
    """
    if xp is None:
        xp = require_gpu()
    dtype = np.dtype(X.dtype if dtype is None else dtype)
    n, D = X.shape
    r, c = np.tril_indices(D)
    packed = np.ascontiguousarray(np.asarray(X_cov)[:, r, c], dtype=dtype)  # host gather
    out_R = None if R is None else xp.asarray(np.ascontiguousarray(R, dtype=dtype))
    return xp.asarray(np.ascontiguousarray(X, dtype=dtype)), xp.asarray(packed), out_R


def device_info() -> dict[str, Any]:
    """What this process can do on a GPU: ``ok`` (CuPy, a device and numba.cuda usable),
    ``reason`` when not, and the device's ``name`` and ``compute_capability``. Never raises."""
    info: dict[str, Any] = {"ok": False, "reason": ""}
    try:
        import cupy  # noqa: PLC0415 - optional dependency, only on a worker asked about its GPU
    except ImportError as exc:
        info["reason"] = f"CuPy is not installed (pip install 'xd-dask[gpu]'): {exc}"
        return info
    try:
        if not cupy.is_available():
            info["reason"] = "CuPy finds no usable CUDA device"
            return info
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        info["name"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        info["compute_capability"] = dev.compute_capability
    except Exception as exc:  # noqa: BLE001 - any driver/runtime failure means "no GPU here"
        info["reason"] = f"CUDA device query failed: {exc}"
        return info
    try:
        from numba import cuda  # noqa: PLC0415 - numba-cuda is optional (xd-dask[gpu])

        if not cuda.is_available():
            info["reason"] = "numba.cuda finds no device (install numba-cuda: xd-dask[gpu])"
            return info
    except Exception as exc:  # noqa: BLE001
        info["reason"] = f"numba.cuda is not usable (install numba-cuda: xd-dask[gpu]): {exc}"
        return info
    info["ok"] = True
    return info

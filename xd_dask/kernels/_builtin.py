"""The built-in backends and their kernels (see :mod:`.registry` for the call signatures).

Each loader adapts a backend's per-pattern function to the registry's signature; nothing is
imported (and nothing compiled) until a kernel first runs.
"""

from __future__ import annotations

import numpy as np

from xd_dask.kernels._common import array_namespace
from xd_dask.kernels.registry import register, register_backend

# Preference order of "auto": the compiled CPU kernels first (NumPy), then the generated
# numba.cuda kernels (CuPy; numba-cuda from the ``gpu`` extra), the portable oracle last.
register_backend("numba", namespaces=("numpy",), projections=True)
register_backend("cuda", namespaces=("cupy",), projections=True, packed=True)
register_backend("reference", namespaces=("numpy", "cupy"), projections=True)


def _numba_stats():
    from xd_dask.kernels._numba import pattern_stats_numba  # noqa: PLC0415 - lazy

    def run(x, S, rw, log_weights, means, covs, R, log_background, chunk_bytes):
        rw = np.ascontiguousarray(rw)
        return pattern_stats_numba(x, S, rw, log_weights, means, covs, log_background, R)

    return run


def _numba_logdens():
    from xd_dask.kernels._numba import pattern_logdens_numba  # noqa: PLC0415 - lazy

    def run(x, S, log_weights, means, covs, R, chunk_bytes):
        return pattern_logdens_numba(x, S, log_weights, means, covs, R)

    return run


def _numba_posterior():
    from xd_dask.kernels import _numba_posterior as mod  # noqa: PLC0415 - lazy

    def run(job):
        return mod.pattern_posterior_numba(job)

    run.ready = mod.is_compiled  # see xd_dask.kernels._posterior.COMPILE_MIN_PAIRS
    return run


def _cuda_stats():
    from xd_dask.kernels._cuda import pattern_stats_cuda  # noqa: PLC0415 - lazy

    def run(x, S, rw, log_weights, means, covs, R, log_background, chunk_bytes):
        return pattern_stats_cuda(x, S, rw, log_weights, means, covs, log_background, R)

    return run


def _cuda_logdens():
    from xd_dask.kernels._cuda import pattern_logdens_cuda  # noqa: PLC0415 - lazy

    def run(x, S, log_weights, means, covs, R, chunk_bytes):
        return pattern_logdens_cuda(x, S, log_weights, means, covs, R)

    return run


def _cuda_posterior():
    from xd_dask.kernels._cuda import pattern_posterior_cuda  # noqa: PLC0415 - lazy

    return pattern_posterior_cuda


def _ref_stats():
    from xd_dask.kernels.reference import pattern_stats_ref  # noqa: PLC0415

    def run(x, S, rw, log_weights, means, covs, R, log_background, chunk_bytes):
        xp = array_namespace(x)
        lw, m, V = xp.asarray(log_weights), xp.asarray(means), xp.asarray(covs)
        return pattern_stats_ref(x, S, rw, lw, m, V, R, chunk_bytes, log_background)

    return run


def _ref_logdens():
    from xd_dask.kernels.reference import pattern_logdens_ref  # noqa: PLC0415

    def run(x, S, log_weights, means, covs, R, chunk_bytes):
        xp = array_namespace(x)
        lw, m, V = xp.asarray(log_weights), xp.asarray(means), xp.asarray(covs)
        return pattern_logdens_ref(x, S, lw, m, V, R, chunk_bytes)

    return run


def _ref_posterior():
    from xd_dask.kernels.reference_posterior import pattern_posterior_ref  # noqa: PLC0415

    return pattern_posterior_ref


register("stats", "numba", _numba_stats)
register("logdens", "numba", _numba_logdens)
register("posterior", "numba", _numba_posterior, projections=False)
register("stats", "cuda", _cuda_stats)
register("logdens", "cuda", _cuda_logdens)
register("posterior", "cuda", _cuda_posterior)  # R and top-k: the reference on the device
register("stats", "reference", _ref_stats)
register("logdens", "reference", _ref_logdens)
register("posterior", "reference", _ref_posterior)

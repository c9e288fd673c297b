"""The built-in backends and their kernels (see :mod:`.registry` for the contract).

Each loader adapts a backend's per-pattern function to the registry's contract (one
:class:`xd_dask.kernels.driver.Block` in, the pattern's result out); nothing is imported (and
nothing compiled) until a kernel first runs.
"""

from __future__ import annotations

from xd_dask.kernels._common import array_namespace
from xd_dask.kernels.registry import register, register_backend

# Preference order of "auto": the compiled CPU kernels first (NumPy), then the generated
# numba.cuda kernels (CuPy; numba-cuda from the ``gpu`` extra), the portable oracle last.
register_backend("numba", namespaces=("numpy",), projections=True)
register_backend("cuda", namespaces=("cupy",), projections=True, packed=True)
register_backend("reference", namespaces=("numpy", "cupy"), projections=True)


def _ones(b):
    """The block's row weights (float64), ones when the call has none."""
    xp = array_namespace(b.x)
    return xp.ones(b.x.shape[0], dtype=xp.float64) if b.rw is None else b.rw


def _rows_params(b):
    """(x, S, rw, log_weights, means, covs) of a block, the common head of the arguments."""
    return b.x, b.S, _ones(b), b.log_weights, b.means, b.covs


def _numba_pass(run, kind: str):
    """A compiled CPU kernel, one variant per (d, dtype, D) of ``kind`` ("stats"; "dens" for
    log densities and moves); ``run.warm(shapes)`` compiles a call's variants once across the
    processes sharing the kernel cache."""
    from xd_dask.kernels import _numba  # noqa: PLC0415 - lazy

    run.warm = lambda shapes: _numba.warm([(kind, d, fp32, 0, D) for d, fp32, D in shapes])
    return run


def _numba_stats():
    from xd_dask.kernels._numba import pattern_stats_numba  # noqa: PLC0415 - lazy

    def run(b):
        return pattern_stats_numba(*_rows_params(b), b.log_background, b.R)

    return _numba_pass(run, "stats")


def _numba_logdens():
    from xd_dask.kernels._numba import pattern_logdens_numba  # noqa: PLC0415 - lazy

    def run(b):
        return pattern_logdens_numba(b.x, b.S, b.log_weights, b.means, b.covs, b.R)

    return _numba_pass(run, "dens")


def _numba_moves():
    from xd_dask.kernels._numba import pattern_moves_numba  # noqa: PLC0415 - lazy

    def run(b):
        return pattern_moves_numba(*_rows_params(b), b.log_background, b.R)

    return _numba_pass(run, "dens")


def _numba_posterior():
    from xd_dask.kernels import _numba_posterior as mod  # noqa: PLC0415 - lazy

    def run(block):
        return mod.pattern_posterior_numba(block)

    run.readiness = mod.readiness  # "auto" weighs compiling against the reference
    return run


def _cuda_stats():
    from xd_dask.kernels._cuda import pattern_stats_cuda  # noqa: PLC0415 - lazy

    return lambda b: pattern_stats_cuda(*_rows_params(b), b.log_background, b.R)


def _cuda_logdens():
    from xd_dask.kernels._cuda import pattern_logdens_cuda  # noqa: PLC0415 - lazy

    return lambda b: pattern_logdens_cuda(b.x, b.S, b.log_weights, b.means, b.covs, b.R)


def _cuda_moves():
    from xd_dask.kernels._cuda import pattern_moves_cuda  # noqa: PLC0415 - lazy

    return lambda b: pattern_moves_cuda(*_rows_params(b), b.log_background, b.R)


def _cuda_posterior():
    from xd_dask.kernels._cuda import pattern_posterior_cuda  # noqa: PLC0415 - lazy

    return pattern_posterior_cuda


def _ref_params(b):
    xp = array_namespace(b.x)
    return xp.asarray(b.log_weights), xp.asarray(b.means), xp.asarray(b.covs)


def _ref_stats():
    from xd_dask.kernels.reference import pattern_stats_ref  # noqa: PLC0415

    def run(b):
        rw = _ones(b)
        return pattern_stats_ref(b.x, b.S, rw, *_ref_params(b), b.R, b.chunk_bytes,
                                 b.log_background)  # fmt: skip

    return run


def _ref_logdens():
    from xd_dask.kernels.reference import pattern_logdens_ref  # noqa: PLC0415

    return lambda b: pattern_logdens_ref(b.x, b.S, *_ref_params(b), b.R, b.chunk_bytes)


def _ref_moves():
    from xd_dask.kernels.reference import pattern_moves_ref  # noqa: PLC0415

    def run(b):
        return pattern_moves_ref(b.x, b.S, b.rw, *_ref_params(b), b.R, b.chunk_bytes,
                                 b.log_background)  # fmt: skip

    return run


def _ref_posterior():
    from xd_dask.kernels.reference_posterior import pattern_posterior_ref  # noqa: PLC0415

    return pattern_posterior_ref


register("stats", "numba", _numba_stats)
register("logdens", "numba", _numba_logdens)
register("moves", "numba", _numba_moves)
register("posterior", "numba", _numba_posterior, projections=False)
register("stats", "cuda", _cuda_stats)
register("logdens", "cuda", _cuda_logdens)
register("moves", "cuda", _cuda_moves)
register("posterior", "cuda", _cuda_posterior)  # R and top-k: the reference on the device
register("stats", "reference", _ref_stats)
register("logdens", "reference", _ref_logdens)
register("moves", "reference", _ref_moves)
register("posterior", "reference", _ref_posterior)

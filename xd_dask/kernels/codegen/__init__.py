"""Code generation for the compiled XD kernels: one algebra, one emitter per target.

- :mod:`.algebra`: target-neutral straight-line statements over named scalars for one
  (row, component) pair or one row - T = V + S, LDL^T, log det, u = T^-1 w, T^-1, the
  statistics' terms and the posterior's terms (DESIGN.md 2-4a).
- :mod:`.emit_numba`: the Numba CPU emitter (SIMD lane = component, lane blocks): the
  statistics, log-density and posterior kernels' Python source.

A GPU emitter (numba.cuda) reuses the algebra functions with its own ``par`` accessor, its own
``logdet`` hook and its own loops and reductions.
"""

from __future__ import annotations

from xd_dask.kernels.codegen import algebra, emit_numba

__all__ = ["algebra", "emit_numba", "source_files"]


def source_files() -> list[str]:
    """Paths of the generator's modules (their bytes key the compiled-kernel cache)."""
    return [algebra.__file__, emit_numba.__file__]

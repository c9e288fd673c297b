"""Code generation for the compiled XD kernels: one algebra, one emitter per target.

- :mod:`.algebra`: target-neutral straight-line statements over named scalars for one
  (row, component) pair or one row - T = V + S, LDL^T, log det, u = T^-1 w, T^-1, the
  statistics' terms, the split-and-merge sums' terms and the posterior's terms (DESIGN.md
  2-4c) - and the constants every emitter's code shares (``PAD_LOGW``, ``BG_OFF``).
- :mod:`.emit_numba`, :mod:`.emit_numba_posterior`: the Numba CPU emitter (SIMD lane =
  component, lane blocks): the statistics pass (also log densities and split-and-merge sums)
  and the posterior.
- :mod:`.emit_cuda`: the numba.cuda emitter (thread = component or pair or row).
- :mod:`.rows`: the catalogue row builder's pass (classify a row, build its S, check that it
  is positive definite with the algebra's LDL^T), vectorised across rows.

Each emitter says which numeric constants its code reads (``constants(fp32)``); the runtime
modules (:mod:`.._numba_runtime`, :mod:`.._numba_lanes`, :mod:`.._cuda`) add only functions
(``_comp_sums`` compiles the posterior's lane program of :mod:`.emit_numba_posterior` to vector
IR). Nothing here imports Numba.
"""

from __future__ import annotations

from pathlib import Path

from xd_dask.kernels.codegen import algebra, emit_cuda, emit_numba, emit_numba_posterior, rows

__all__ = ["algebra", "emit_cuda", "emit_numba", "emit_numba_posterior", "rows", "source_files"]


def source_files() -> list[str]:
    """Paths of every module of the generator (their bytes key the compiled-kernel caches, so
    a change to any emitter invalidates every cached kernel)."""
    return sorted(str(p) for p in Path(__file__).parent.glob("*.py"))

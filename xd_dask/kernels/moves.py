"""The split-and-merge criteria's sums over rows: the ``"moves"`` kernel (DESIGN.md 4c).

At the current parameters, with r_ij the responsibilities (a background component takes its
share of each row's normalisation) and w_i the row weights, one pass gives

    RR_jk = sum_i w_i r_ij r_ik                         (K, K)
    and per component the terms of :data:`xd_dask.kernels.codegen.algebra.MOVE_SUMS`:
    n_j = sum_i w_i r_ij,  flogf_j = sum_i w_i r_ij log(w_i r_ij),
    flogp_j = sum_i w_i r_ij log N(x_i | R_i m_j, R_i V_j R_i^T + S_i)

over each row's observed fields (missing fields and projections as in the statistics). They
are sums, so blocks of rows combine by ``+`` (:class:`MoveSums`). Backends: the reference
(:func:`xd_dask.kernels.reference.pattern_moves_ref`), the compiled CPU kernel
(:func:`xd_dask.kernels._numba.pattern_moves_numba`) and the GPU one
(:func:`xd_dask.kernels._cuda.pattern_moves_cuda`), per pattern through the one driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from xd_dask.kernels import driver
from xd_dask.kernels._common import to_numpy
from xd_dask.kernels.codegen import algebra
from xd_dask.params import Params

__all__ = ["MOVES", "MoveSums", "move_sums"]


def names() -> tuple[str, ...]:
    """The per-component sums, in the order of :data:`.codegen.algebra.MOVE_SUMS`."""
    return tuple(name for name, _ in algebra.MOVE_SUMS)


@dataclass
class MoveSums:
    """Sums over rows for the split and merge criteria (module docstring); they add up.

    RR : (K, K) float64;  sums : (len(MOVE_SUMS), K) float64, one row per term of the table
    (``ms["n"]``, ``ms["flogf"]``, ``ms["flogp"]``);  n_rows : rows seen.
    """

    RR: np.ndarray
    sums: np.ndarray
    n_rows: int = 0

    @classmethod
    def zeros(cls, K: int) -> MoveSums:
        return cls(np.zeros((K, K)), np.zeros((len(names()), K)), 0)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.sums[names().index(name)]

    def __add__(self, other: MoveSums) -> MoveSums:
        if not isinstance(other, MoveSums):
            return NotImplemented
        return MoveSums(self.RR + other.RR, self.sums + other.sums, self.n_rows + other.n_rows)


def _begin(call: driver.Call) -> MoveSums:
    total = MoveSums.zeros(call.K)
    total.n_rows = int(call.n)
    return total


def _fold(total: MoveSums, block: driver.Block, result: Any) -> None:
    RR, sums = result
    total.RR += to_numpy(RR)
    total.sums += to_numpy(sums)


#: The moves kernel (observed sub-blocks of the parameters without R, like the statistics).
MOVES = driver.Kernel("moves", _begin, _fold)


def move_sums(
    X: Any,
    X_cov: Any,
    params: Params,
    *,
    row_weights: Any = None,
    R: Any = None,
    backend: str = "auto",
    chunk_bytes: int | None = None,
    check: bool = True,
) -> MoveSums:
    """The split-and-merge criteria's sums (module docstring) over the rows ``X`` (n, d)
    (NaN = missing), ``X_cov`` ((n, d, d) or packed), optional row weights (n,) and projections
    ``R`` (n, d, D), at ``params``; ``backend``, ``chunk_bytes``, ``check`` as in
    :func:`xd_dask.kernels.compute_stats`. NumPy results, float64."""
    return driver.run(
        MOVES, X, X_cov, params, R=R, row_weights=row_weights, backend=backend,
        chunk_bytes=chunk_bytes, check=check,
    )  # fmt: skip

"""The one per-pattern driver of every kernel (statistics, log-densities, moves, posterior).

:func:`run` chooses the backend (:func:`.registry.resolve`), validates and centres the rows
(:func:`._common.prepare`: translation by the mixture mean leaves every result unchanged and
keeps float32 accurate far from the origin), groups them by missingness pattern (NaN in ``X``
marks an unobserved field; a row's likelihood is the exact marginal over its observed fields),
hands each pattern to the backend's implementation as a :class:`Block` and folds the pattern's
result into the call's output through the kernel's :class:`Kernel` description. A kernel is
therefore a :class:`Kernel` (how its output is made) plus one function per backend (the
registry's per-pattern contract, :mod:`.registry`); no kernel has a loop of its own.

Compilation. An implementation that compiles per variant may carry ``warm(shapes)``: the driver
hands it every pattern's (d, float32?, D) before the loop, so that the variants a call needs are
compiled together, once across the processes sharing a kernel cache (see
:func:`xd_dask.kernels._numba.warm`).

``backend="auto"`` and compilation. For a kernel with ``cost_choice`` (the posterior: a one-off
call per row, where compiling can cost more than the whole call), an implementation that
reports :func:`readiness` is used when it is loaded or cached on disk, or once the reference's
measured time on that variant would exceed the compile time: the reference runs while its
accumulated time plus the pattern's estimate stays below the measured (or estimated) compile
time of the variant (the rent-or-buy rule: the total never exceeds twice what compiling at
once would have cost, and a call too small to amortise a compile never pays for one).
Iterated kernels (statistics, log-densities, moves) always take the preferred backend: a fit
amortises the compile and its E-steps stay on one implementation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xd_dask.kernels import registry
from xd_dask.kernels._common import (
    NotPositiveDefiniteError,
    Pattern,
    array_namespace,
    missingness_patterns,
    packed_index,
    to_numpy,
)
from xd_dask.kernels._validate import check_inputs
from xd_dask.params import Params

__all__ = ["Block", "Call", "Kernel", "reference_ns_per_pair", "run"]


@dataclass
class Call:
    """What a kernel's :class:`Kernel` hooks see of the whole call.

    xp : the inputs' array namespace;  n, K, D : rows, components, features;
    X : the caller's (n, D) (or (n, d) with R) values;  params : the mixture;
    has_R : projections given;  options : the kernel's keyword options (e.g. ``top_k``).
    """

    xp: Any
    n: int
    K: int
    D: int
    X: Any
    params: Params
    has_R: bool
    options: dict[str, Any]


@dataclass
class Block:
    """One missingness pattern of a call: what an implementation gets (see :mod:`.registry`).

    x : (n, d) centred observed values in the compute dtype (float32/float64), no NaN.
    S : (n, d, d) noise covariances, or packed (n, d (d + 1) / 2) for a ``packed`` backend.
    R : (n, d, D) projections in the compute dtype, or None.
    rw : (n,) float64 row weights, or None (all 1).
    log_weights : (K,) float64.  means, covs : float64 parameters, centred: the observed
        sub-vectors / sub-blocks (K, d), (K, d, d) without R unless the kernel takes full
        parameters (``Kernel.full_params``); (K, D), (K, D, D) with R or full.
    log_background : the background's log density (weight included) on these fields, or None.
    rows : (n,) the pattern's rows in the call (namespace of the inputs).
    cols : (D,) host int64 field order of full parameters: observed first, then unobserved
        (``arange(D)`` with R).  centre : (D,) float64 centring constant in ``cols`` order.
    x0 : the caller's values (dtype of x; outputs that keep the input's precision).
    chunk_bytes : working-set bound of the reference.  out : the call's output (kernels that
        write in place).  options : the kernel's keyword options.
    """

    x: Any
    S: Any
    R: Any
    rw: Any
    log_weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    log_background: float | None
    rows: Any
    cols: np.ndarray
    centre: np.ndarray
    x0: Any
    chunk_bytes: int | None
    out: Any = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def top_k(self) -> int:
        return int(self.options.get("top_k", 0))


@dataclass(frozen=True)
class Kernel:
    """How the driver runs a kernel.

    name : the kernel's name in the registry.
    begin(call) -> acc : the call's output (allocated) or accumulator.
    fold(acc, block, result) : one pattern's result into it.
    finish(acc) -> the call's return value.
    full_params : implementations take the full D-dimensional parameters even without R.
    cost_choice : ``backend="auto"`` may run a pattern on the reference while that costs less
        than making the compiled variant ready (module docstring).
    """

    name: str
    begin: Callable[[Call], Any]
    fold: Callable[[Any, Block, Any], None]
    finish: Callable[[Any], Any] = lambda acc: acc
    full_params: bool = False
    cost_choice: bool = False


def run(
    kernel: Kernel,
    X: Any,
    X_cov: Any,
    params: Params,
    *,
    R: Any = None,
    row_weights: Any = None,
    backend: str = "auto",
    chunk_bytes: int | None = None,
    check: bool = True,
    **options: Any,
) -> Any:
    """Run ``kernel`` over the rows ``X`` (n, d), ``X_cov`` ((n, d, d) or packed), with
    optional projections ``R`` (n, d, D) and row weights (n,); see :mod:`xd_dask.kernels`."""
    name = registry.resolve(kernel.name, backend, X, R)
    xp, Xc, X_cov, log_weights, m, V, c = prepare(X, X_cov, params, R, row_weights, check)
    K, D = m.shape
    call = Call(xp, X.shape[0], K, D, X, params, R is not None, options)
    acc = kernel.begin(call)
    rw = None if row_weights is None else xp.asarray(row_weights, dtype=xp.float64)
    x0 = X if X.dtype in (xp.float32, xp.float64) else xp.asarray(X, dtype=xp.float64)
    background = params.background
    patterns = missingness_patterns(Xc)
    warm = getattr(registry.implementation(kernel.name, name), "warm", None)
    if warm is not None and not (backend == "auto" and kernel.cost_choice):
        fp32 = Xc.dtype == xp.float32
        warm([(len(p.observed), fp32, 0 if R is None else D) for p in patterns])
    for pat in patterns:
        x, S, Rp = pattern_blocks(xp, Xc, X_cov, R, pat)
        o = pat.observed
        if R is None:
            unobserved = np.ones(D, dtype=bool)
            unobserved[o] = False
            cols = np.concatenate([o, np.flatnonzero(unobserved)])
        else:
            cols = np.arange(D)
        if R is None and not kernel.full_params:
            mp = np.ascontiguousarray(m[:, o])
            Vp = np.ascontiguousarray(V[:, o[:, None], o[None, :]])
        else:
            mp, Vp = m, V
        block = Block(
            x, S, Rp, None if rw is None else rw[xp.asarray(pat.rows)], log_weights, mp, Vp,
            None if background is None else background.log_density(o),
            pat.rows, cols, c[cols], x0, chunk_bytes, acc, options,
        )  # fmt: skip
        run_name = _choose(kernel, name, backend, block)
        block.S = registry.noise_for(run_name, block.S)
        t0 = time.perf_counter()
        try:
            res = registry.implementation(kernel.name, run_name)(block)
        except NotPositiveDefiniteError as err:
            raise NotPositiveDefiniteError(int(pat.rows[err.row]), err.component) from None
        if run_name == "reference":
            _record_reference(kernel.name, time.perf_counter() - t0, x.shape[0] * K)
        kernel.fold(acc, block, res)
    return kernel.finish(acc)


# --------------------------------------------------------------------------- preparation
def prepare(X: Any, X_cov: Any, params: Params, R: Any, row_weights: Any, check: bool):
    """Validate, cast parameters (:class:`xd_dask.params.Params`) to float64 and centre the
    data; returns the pieces per call."""
    xp = array_namespace(X, X_cov)
    if X.dtype not in (xp.float32, xp.float64):
        X = xp.asarray(X, dtype=xp.float64)
    if X_cov.dtype != X.dtype:
        X_cov = xp.asarray(X_cov, dtype=X.dtype)
    weights = np.asarray(to_numpy(params.weights), dtype=np.float64)
    means = np.asarray(to_numpy(params.means), dtype=np.float64)
    covariances = np.asarray(to_numpy(params.covariances), dtype=np.float64)
    if check:
        check_inputs(X, X_cov, weights, means, covariances, row_weights, R)
    if np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError("mixture weights must be finite and non-negative")
    with np.errstate(divide="ignore"):
        log_weights = np.log(weights)
    # Centre: x_i - R_i c and m_j - c with c the mixture mean (exact translation invariance).
    c = weights @ means / max(weights.sum(), np.finfo(float).tiny)  # (D,)
    c_x = xp.asarray(c, dtype=xp.float64)
    if R is None:
        # one float64 temporary (the cast happens inside the subtraction), then X's dtype
        Xc = xp.asarray(xp.subtract(X, c_x[None, :], dtype=xp.float64), dtype=X.dtype)
    else:
        Rc = xp.einsum("nid,d->ni", xp.asarray(R, dtype=xp.float64), c_x)
        Xc = xp.asarray(xp.asarray(X, dtype=xp.float64) - Rc, dtype=X.dtype)
    return xp, Xc, X_cov, log_weights, means - c[None, :], covariances, c


def pattern_blocks(xp: Any, Xc: Any, X_cov: Any, R: Any, pat: Pattern):
    """The observed sub-vectors / sub-blocks of one pattern's rows, with as few copies as possible:
    none when the pattern is every row with every field, one gather otherwise (fresh large arrays
    are expensive to fault in, so chained fancy indexing costs more than the kernel itself)."""
    n, D = Xc.shape
    all_rows = len(pat.rows) == n  # patterns partition the rows, so this means rows == arange(n)
    all_fields = len(pat.observed) == D
    packed = X_cov.ndim == 2  # (n, D (D + 1) / 2) lower triangles: S comes back packed too
    if all_rows and all_fields:
        x, S, Rp = Xc, X_cov, R
    else:
        rows = xp.asarray(pat.rows)
        if all_fields:
            x, S = Xc[rows], X_cov[rows]
            Rp = None if R is None else R[rows]
        else:
            o = xp.asarray(pat.observed)
            x = Xc[rows[:, None], o[None, :]]
            if packed:
                S = X_cov[rows[:, None], xp.asarray(packed_index(pat.observed))[None, :]]
            else:
                S = X_cov[rows[:, None, None], o[None, :, None], o[None, None, :]]
            Rp = None if R is None else R[rows][:, o, :]
    if Rp is not None:
        Rp = xp.asarray(Rp, dtype=Xc.dtype)
    if xp is np:
        x = np.ascontiguousarray(x)
        S = np.ascontiguousarray(S)
    return x, S, Rp


# --------------------------------------------------------------------------- auto: by cost
#: Reference cost per (row, component) pair before this process has measured one (seconds,
#: D = 7, one core of this machine class: the posterior ~3,700-4,200 ns, the others less).
REFERENCE_PRIOR_S = 4.2e-6
_ref_rate: dict[str, float] = {}  # kernel -> measured seconds per pair of the reference
_rent: dict[Any, float] = {}  # compiled variant -> reference seconds spent instead of it
_lock = threading.Lock()


def _record_reference(kernel: str, seconds: float, pairs: int) -> None:
    if pairs >= 4096:  # small calls measure mostly overhead
        with _lock:
            _ref_rate[kernel] = seconds / pairs


def reference_ns_per_pair(kernel: str) -> float:
    """The reference's cost per pair of ``kernel`` in this process (measured, else the prior)."""
    return 1e9 * _ref_rate.get(kernel, REFERENCE_PRIOR_S)


def _choose(kernel: Kernel, name: str, backend: str, block: Block) -> str:
    """``name``, or "reference" when ``backend`` is "auto", the kernel chooses by cost and the
    reference on this pattern costs less than making ``name``'s variant ready (module doc)."""
    if backend != "auto" or not kernel.cost_choice or name == "reference":
        return name
    readiness = getattr(registry.implementation(kernel.name, name), "readiness", None)
    if readiness is None:
        return name
    key, seconds = readiness(block)
    if seconds <= 0.0:
        return name
    estimate = block.x.shape[0] * block.means.shape[0] * reference_ns_per_pair(kernel.name) * 1e-9
    with _lock:
        spent = _rent.get(key, 0.0)
        if spent + estimate >= seconds:
            return name  # compiling now costs less than renting the reference any longer
        _rent[key] = spent + estimate
    return "reference"

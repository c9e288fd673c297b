"""Per-row posteriors of the true values: the dispatcher (DESIGN.md 4a).

The posterior of row i's true value v_i is a MIXTURE of Gaussians: component j contributes
N(b_ij, B_ij) with weight r_ij (its responsibility). :func:`posterior` returns its moment-matched
mean and covariance and, optionally, the most probable components' own Gaussians; the numerics
(no cancellation, float64 outputs) are described in :mod:`.reference_posterior`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from xd_dask.kernels import driver
from xd_dask.kernels._common import NotPositiveDefiniteError, array_namespace, to_numpy
from xd_dask.params import Params

__all__ = ["ESCALATE", "POSTERIOR", "PosteriorSummary", "escalate", "posterior"]

#: Recompute a row when posterior variance / noise variance < this in an observed field (the
#: compiled kernels' B = S - S T^-1 S cancels there, relative error ~eps / q): float32 rows by
#: the float64 kernel (q = 0.05 bounds the float32 error near 1e-6), float64 rows by the
#: reference's Joseph form (q = 1e-8 bounds the float64 error near 1e-8). The kernels flag such
#: rows; :func:`escalate` recomputes them (every compiled backend, CPU and GPU).
ESCALATE = {np.dtype(np.float32): 0.05, np.dtype(np.float64): 1e-8}


@dataclass
class PosteriorSummary:
    """Per-row posterior of the true values v_i (n rows, D features, K components), float64.

    The posterior is a mixture over the components; ``mean`` and ``cov`` are its moment-matched
    (first two) moments. With a background component they are those of the Gaussian part, i.e.
    conditional on the row not being background; the responsibilities below are the full ones
    (normalised with the background, so ``resp.sum(1) + background_resp == 1``).

    mean : (n, D);  cov : (n, D, D)
    map_component : (n,) int64, the most probable component;  map_resp : (n,) its responsibility
    background_resp : (n,) or None (no background component)
    resp : (n, K) or None (unless asked for)
    top_component : (n, k) int64, the k most probable components, most probable first (ties in
        index order); top_resp : (n, k); top_mean : (n, k, D), top_cov : (n, k, D, D) their own
        Gaussian posteriors N(b_ij, B_ij); all None when k = 0.
    """

    mean: Any
    cov: Any
    map_component: Any
    map_resp: Any
    background_resp: Any = None
    resp: Any = None
    top_component: Any = None
    top_resp: Any = None
    top_mean: Any = None
    top_cov: Any = None

    @classmethod
    def allocate(cls, xp: Any, n: int, K: int, D: int, top_k: int, with_resp: bool):
        f64 = xp.float64
        k = top_k
        return cls(
            xp.empty((n, D), f64),
            xp.empty((n, D, D), f64),
            xp.empty(n, xp.int64),
            xp.empty(n, f64),
            xp.zeros(n, f64),
            xp.empty((n, K), f64) if with_resp else None,
            xp.empty((n, k), xp.int64),
            xp.empty((n, k), f64),
            xp.empty((n, k, D), f64),
            xp.empty((n, k, D, D), f64),
        )

    def to_numpy(self) -> PosteriorSummary:
        return PosteriorSummary(
            *(None if (v := getattr(self, f.name)) is None else to_numpy(v) for f in fields(self))
        )


def _begin(call: driver.Call) -> PosteriorSummary:
    call.options["top_k"] = top_k = min(int(call.options.get("top_k", 0)), call.K)
    with_resp = bool(call.options.get("return_resp", False))
    return PosteriorSummary.allocate(call.xp, call.n, call.K, call.D, top_k, with_resp)


def _fold(out: PosteriorSummary, block: driver.Block, result: Any) -> None:
    """Nothing to add: the implementations write ``block.out`` at the pattern's rows."""


#: The posterior kernel (full parameters: the unobserved fields' posteriors come through V;
#: ``backend="auto"`` weighs compiling against the reference, see :mod:`.driver`).
POSTERIOR = driver.Kernel("posterior", _begin, _fold, full_params=True, cost_choice=True)


def posterior(
    X: Any,
    X_cov: Any,
    params: Params,
    *,
    R: Any = None,
    top_k: int = 0,
    summary: bool = False,
    return_resp: bool = False,
    backend: str = "auto",
    chunk_bytes: int | None = None,
    check: bool = True,
):
    """Per-row deconvolved posterior of the true values v_i.

    The posterior of v_i is a mixture of Gaussians N(b_ij, B_ij) with weights r_ij (DESIGN.md
    4a); by default its moment-matched mean and covariance are returned. Computed without
    cancellation (B_ij = V_j T_ij^-1 S_i, centred mixture moments) and returned in float64 for
    float32 or float64 input; the mean of an observed field is the input value minus a small
    correction, so it keeps the input's precision.

    Parameters
    ----------
    X : (n, d) float32/float64 (NumPy or CuPy), NaN marks a missing field (its posterior comes
        from the observed fields through each component's covariance).
    X_cov : (n, d, d) noise covariances (may be singular: a zero-noise field's posterior is
        its value, with zero variance), or their packed lower triangles (n, d (d + 1) / 2).
    params : the mixture (:class:`xd_dask.params.Params`); with a background component the
        mean/cov are those of the Gaussian part and ``background_resp`` its responsibility.
    R : (n, d, D) projections, optional (reference backend); each R_i of full row rank.
    top_k : also return the k most probable components' own posteriors (``summary=True``).
    summary : return a :class:`PosteriorSummary` instead of a tuple.
    return_resp : also return the (n, K) responsibilities.
    backend : "auto" or a registered backend. "auto" runs the compiled kernel on NumPy input
        without R when it is loaded or cached on disk, or when the reference would cost more
        than compiling it (measured; see :mod:`xd_dask.kernels.driver`).
    chunk_bytes, check : as in :func:`xd_dask.kernels.compute_stats`.

    Returns
    -------
    ``(mean (n, D), cov (n, D, D))``, plus ``resp (n, K)`` with ``return_resp``; or a
    :class:`PosteriorSummary` with ``summary``.
    """
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_k and not summary:
        raise ValueError("top_k needs summary=True (the top-k posteriors are summary fields)")
    out = driver.run(
        POSTERIOR, X, X_cov, params, R=R, backend=backend, chunk_bytes=chunk_bytes, check=check,
        top_k=top_k, return_resp=return_resp,
    )  # fmt: skip
    if params.background is None:
        out.background_resp = None
    if not out.top_component.shape[1]:
        out.top_component = out.top_resp = out.top_mean = out.top_cov = None
    if summary:
        return out
    if return_resp:
        return out.mean, out.cov, out.resp
    return out.mean, out.cov


def escalate(run: Any, block: driver.Block, idx: Any) -> Any:
    """Recompute the pattern rows ``idx`` (host indices) with ``run`` (a per-pattern posterior
    implementation) in float64 and store them into ``block.out``; returns ``run``'s result.

    x is centred anew from the caller's values (the float32 centred x carries the rounding of
    x - c, which the posterior mean of a prior-dominated row inherits one to one); the rows go
    through a small output of their own."""
    xp = array_namespace(block.x)  # NumPy, or CuPy for the GPU kernel's rows
    idx_x = xp.asarray(idx)
    rows = xp.asarray(block.rows)[idx_x]
    d, k, (K, D) = block.x.shape[1], len(idx), block.means.shape
    x0 = xp.asarray(block.x0[rows], dtype=xp.float64)  # (k, D)
    out = PosteriorSummary.allocate(xp, k, K, D, block.top_k, block.out.resp is not None)
    sub = dataclasses.replace(
        block,
        x=xp.ascontiguousarray(x0[:, xp.asarray(block.cols[:d])] - xp.asarray(block.centre[:d])),
        S=xp.ascontiguousarray(block.S[idx_x], dtype=xp.float64),
        rows=xp.arange(k),
        x0=x0,
        out=out,
    )
    try:
        res = run(sub)
    except NotPositiveDefiniteError as err:
        raise NotPositiveDefiniteError(int(idx[err.row]), err.component) from None
    for f in dataclasses.fields(out):
        part, whole = getattr(out, f.name), getattr(block.out, f.name)
        if part is not None and whole is not None:
            whole[rows] = part
    return res

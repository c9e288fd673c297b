"""Per-row posteriors of the true values: the dispatcher (DESIGN.md 4a).

The posterior of row i's true value v_i is a MIXTURE of Gaussians: component j contributes
N(b_ij, B_ij) with weight r_ij (its responsibility). :func:`posterior` returns its moment-matched
mean and covariance and, optionally, the most probable components' own Gaussians; the numerics
(no cancellation, float64 outputs) are described in :mod:`.reference_posterior`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from xd_dask.kernels import registry
from xd_dask.kernels._common import (
    NotPositiveDefiniteError,
    missingness_patterns,
    pattern_blocks,
    prepare,
    to_numpy,
)
from xd_dask.params import Params

__all__ = ["COMPILE_MIN_PAIRS", "PosteriorJob", "PosteriorSummary", "posterior"]

#: With ``backend="auto"``, a pattern of fewer (row, component) pairs than this runs on the
#: reference unless the compiled kernel it needs is already loaded in this process: compiling
#: one (per observed/unobserved field count and dtype) takes ~10 s, the reference ~2 us per pair.
#: An implementation declares this through a ``ready(job)`` attribute (see .registry).
COMPILE_MIN_PAIRS = 1 << 20


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


@dataclass
class PosteriorJob:
    """One missingness pattern's posterior call (the registry's ``"posterior"`` argument).

    x : (n, d) centred observed values (compute dtype); S : (n, d, d) their noise.
    log_weights : (K,) float64; means (K, D), covs (K, D, D): FULL centred parameters (float64).
    R : (n, d, D) projections or None. Without R, the pattern observes fields ``cols[:d]`` and
        not ``cols[d:]`` (local order: observed first); with R, ``cols`` = arange(D).
    rows : (n,) the pattern's rows in the outputs; x0 : (N, D), the caller's values in x's dtype
        (the posterior mean of an observed field is x0 minus a small shift, so it keeps the
        input's precision); centre : (D,) float64 in local order, the centring constant.
    log_background : the background's log density on these fields (weight included) or None.
    top_k, chunk_bytes; out : the :class:`PosteriorSummary` to write (rows ``rows``).
    """

    x: Any
    S: Any
    log_weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    R: Any
    rows: Any
    cols: np.ndarray
    x0: Any
    centre: np.ndarray
    log_background: float | None
    top_k: int
    chunk_bytes: int | None
    out: PosteriorSummary


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
        without R, except for patterns smaller than :data:`COMPILE_MIN_PAIRS` whose kernel is not
        compiled yet (they run on the reference).
    chunk_bytes, check : as in :func:`xd_dask.kernels.compute_stats`.

    Returns
    -------
    ``(mean (n, D), cov (n, D, D))``, plus ``resp (n, K)`` with ``return_resp``; or a
    :class:`PosteriorSummary` with ``summary``.
    """
    top_k = int(top_k)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_k and not summary:
        raise ValueError("top_k needs summary=True (the top-k posteriors are summary fields)")
    name = registry.resolve("posterior", backend, X, R)
    fn = registry.implementation("posterior", name)
    ready = getattr(fn, "ready", None) if backend == "auto" and not registry.forced() else None
    xp, Xc, X_cov, log_weights, m, V, c = prepare(X, X_cov, params, R, None, check)
    background = params.background
    n = X.shape[0]
    K, D = m.shape
    top_k = min(top_k, K)
    out = PosteriorSummary.allocate(xp, n, K, D, top_k, return_resp)
    x0 = X if X.dtype in (xp.float32, xp.float64) else xp.asarray(X, dtype=xp.float64)
    for pat in missingness_patterns(Xc):
        x, S, Rp = pattern_blocks(xp, Xc, X_cov, R, pat)
        if R is None:
            cols = np.concatenate([pat.observed, np.setdiff1d(np.arange(D), pat.observed)])
        else:
            cols = np.arange(D)
        job = PosteriorJob(
            x,
            S,
            log_weights,
            m,
            V,
            Rp,
            pat.rows,
            cols,
            x0,
            c[cols],
            None if background is None else background.log_density(pat.observed),
            top_k,
            chunk_bytes,
            out,
        )
        run, run_name = fn, name
        if ready is not None and len(pat.rows) * K < COMPILE_MIN_PAIRS and not ready(job):
            run, run_name = registry.implementation("posterior", "reference"), "reference"
        job.S = registry.noise_for(run_name, job.S)
        try:
            run(job)
        except NotPositiveDefiniteError as err:
            raise NotPositiveDefiniteError(int(pat.rows[err.row]), err.component) from None
    if background is None:
        out.background_resp = None
    if not top_k:
        out.top_component = out.top_resp = out.top_mean = out.top_cov = None
    if summary:
        return out
    if return_resp:
        return out.mean, out.cov, out.resp
    return out.mean, out.cov

"""Regularisation and collapsed components: what every EM-type update does after its moments.

Regularisation (``reg_form``)
-----------------------------
``"add"`` (default; scikit-learn's ``reg_covar`` and the minibatch EM of Ritchie & Murray 2019):
    V_j' = V_j^EM + reg I
``"bovy_w"`` (the reference C implementation's ``w``, for porting fits made with it):
    V_j' = (n_j V_j^EM + w I) / (n_j + 1)
    i.e. ``(sum_i r_ij [(b_ij - m_j')(b_ij - m_j')^T + B_ij] + w I) / (q_j + 1)`` of Bovy et al.
    with ``w = reg_covar``. Batch EM only.

Collapsed components
--------------------
A component counts as collapsed when its count n_j falls below ``min_count``, or its update is
not finite or not safely positive definite (:func:`is_pd`). The default ``min_count`` of batch EM
is the SUPPORT FLOOR ``min(D + 1, N / (2 K))`` rows (in units of the mean row weight; at least
``1e-6 x`` the total weight): a component that explains fewer rows than it needs to define a
D-dimensional covariance is memorising a few rows (typically one absurd row), not describing a
population. Online EM keeps the plain floor ``1e-6 x`` the wave's weight (a wave is a sample).

A collapsed component is re-seeded by splitting the heaviest component along its principal axis:
the two halves sit at m_h +- sqrt(lambda)/2 e with covariance V_h - lambda/4 e e^T each and half
the weight, which keeps the mixture's first and second moments. When rounding makes the split
covariance fail :func:`is_pd` (a component with eigenvalues 1e60 and 1e-2 loses the small ones to
rounding), the halves keep V_h itself instead (the first moment is kept, the second grows by
lambda/4 e e^T), so a re-seeded covariance is always one that already passed the check. The
indices are returned with the update so that the caller can record them.

Background component
--------------------
With a uniform background (:class:`xd_dask.params.Background`, DESIGN.md 4d) the statistics carry
n_bg, the background's share of the rows; its weight is updated like any other, n_bg / W (batch),
or pooled like the s_j (online), and the Gaussian weights then sum to 1 - background weight. Its
box stays fixed.
"""

from __future__ import annotations

import math

import numpy as np

from xd_dask.config import key
from xd_dask.kernels import SuffStats
from xd_dask.params import Params
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = [
    "PD_RTOL",
    "REG_FORMS",
    "background_weight",
    "check_reg",
    "collapse_floor",
    "finish",
    "is_pd",
    "regularise",
    "reseed_collapsed",
    "split_component",
]

#: Regularisation forms (module docstring); the first is the default.
REG_FORMS = ("add", "bovy_w")

#: Smallest pivot^2 the Cholesky factor of a covariance's CORRELATION matrix may have
#: (:func:`is_pd`): about a condition number of 1e12, four decades above float64 rounding, so that
#: the kernels' own factorisations of V_j + S_i never meet a matrix that is PD only by accident.
PD_RTOL = 1e-12


def check_reg(reg_covar: float, reg_form: str) -> None:
    """ValueError unless ``reg_covar`` is a valid ``fit.reg_covar`` and ``reg_form`` a form."""
    if reg_form not in REG_FORMS:
        raise ValueError(f"reg_form must be one of {REG_FORMS}, got {reg_form!r}")
    err = key("fit.reg_covar").validate(reg_covar)
    if err or not math.isfinite(reg_covar):
        raise ValueError(f"reg_covar must be finite and >= 0, got {reg_covar!r}")


def collapse_floor(stats: SuffStats, min_count: float | None, support: bool = False) -> float:
    """Count below which a component is collapsed: ``min_count`` if given, else ``1e-6 W`` (at
    least 1e-10) and, with ``support``, at least the support floor min(D + 1, N / (2 K)) rows."""
    if min_count is not None:
        return float(min_count)
    floor = max(1e-6 * stats.W, 1e-10)
    if support and stats.n_rows > 0:
        K, D = stats.a.shape
        rows = min(D + 1.0, stats.n_rows / (2.0 * K))
        floor = max(floor, rows * stats.W / stats.n_rows)
    return floor


def regularise(sigma: np.ndarray, n: np.ndarray, reg_covar: float, reg_form: str) -> np.ndarray:
    """(K, D, D) regularised covariances (module docstring)."""
    D = sigma.shape[-1]
    eye = np.eye(D)[None]
    if reg_form == "add":
        return sigma + reg_covar * eye
    return (n[:, None, None] * sigma + reg_covar * eye) / (n[:, None, None] + 1.0)


def is_pd(V: np.ndarray, rtol: float = PD_RTOL) -> np.ndarray:
    """(K,) bool: covariance j is finite, symmetric and safely positive definite.

    Safely: the Cholesky factor L of its correlation matrix (V scaled to unit diagonal, so the
    test does not depend on the units of the features) has min(diag L)^2 > ``rtol``.

    V : (K, D, D). Every fit checks its update with this once or twice per step, so the K
    matrices are tested together (one batched factorisation, the same LAPACK call per matrix
    as one at a time; 8 x faster than a loop of ~10 NumPy calls per component at K = 8), and
    one at a time only when some factorisation fails.
    """
    V = np.asarray(V, dtype=np.float64)
    out = np.zeros(V.shape[0], dtype=bool)
    if V.shape[0] == 0:
        return out
    d = np.diagonal(V, axis1=1, axis2=2)
    ok = np.isfinite(V).all(axis=(1, 2)) & (d > 0).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite matrices are out already
        asym = np.abs(V - np.swapaxes(V, 1, 2)).max(axis=(1, 2))
        ok &= ~(asym > 1e-10 * np.abs(V).max(axis=(1, 2)))
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return out
    s = 1.0 / np.sqrt(d[idx])
    with np.errstate(over="ignore", invalid="ignore"):
        corr = V[idx] * s[:, :, None] * s[:, None, :]
    try:
        L = np.linalg.cholesky(corr)
    except np.linalg.LinAlgError:  # some are not PD: find which
        out[idx] = [_safely_pd(c, rtol) for c in corr]
        return out
    out[idx] = _factor_safe(L, rtol)
    return out


def _factor_safe(L: np.ndarray, rtol: float) -> np.ndarray:
    """(..., D, D) Cholesky factors -> finite with min(diag L)^2 > ``rtol``."""
    return np.isfinite(L).all(axis=(-2, -1)) & (
        np.diagonal(L, axis1=-2, axis2=-1).min(axis=-1) ** 2 > rtol
    )


def _safely_pd(corr: np.ndarray, rtol: float) -> bool:
    try:
        return bool(_factor_safe(np.linalg.cholesky(corr), rtol))
    except np.linalg.LinAlgError:
        return False


def split_component(m_h: np.ndarray, V_h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offset ``delta`` (D,) and covariance (D, D) of the two halves of a split along the
    principal axis (module docstring): the halves sit at m_h +- delta."""
    evals, evecs = np.linalg.eigh(V_h)
    lam, e = evals[-1], evecs[:, -1]
    delta = 0.5 * math.sqrt(max(lam, 0.0)) * e
    V_half = V_h - np.outer(delta, delta)
    V_half = 0.5 * (V_half + V_half.T)
    if not is_pd(V_half[None])[0]:
        log.warning(
            "splitting loses precision (eigenvalues %.3g..%.3g): halves keep V", *evals[[0, -1]]
        )
        V_half = V_h.copy()
    return delta, V_half


def reseed_collapsed(
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    bad: np.ndarray,
    total: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Replace each component flagged in ``bad`` by half of the heaviest good component.

    The split keeps the mixture's first and second moments (see the module docstring); every
    covariance it writes has passed :func:`is_pd`. The returned weights sum to ``total`` (1, or
    1 - the background's weight).
    """
    w, m, V = weights.copy(), means.copy(), covariances.copy()
    reseeded = [int(j) for j in np.flatnonzero(bad)]
    good = ~bad
    if not good.any():
        raise FloatingPointError(
            "every mixture component collapsed; the data or the initialisation are degenerate "
            "(check the feature scaling and raise reg_covar)"
        )
    for j in reseeded:
        h = int(np.argmax(np.where(good, w, -np.inf)))
        delta, V_half = split_component(m[h], V[h])
        m[j] = m[h] - delta
        m[h] = m[h] + delta
        V[h] = V_half
        V[j] = V_half
        w[h] = w[j] = 0.5 * w[h]
        good[j] = True
        log.warning("component %d collapsed; re-seeded by splitting component %d", j, h)
    return w / w.sum() * total, m, V, reseeded


def background_weight(share: float) -> float:
    """A background weight from its share of the rows (n_bg / W or the pooled s_bg), kept in
    [tiny, 0.5]: never exactly 0 (a weight of 0 would switch the background off for good) and
    never the bulk of the data (a box that explains most rows means the box or K is wrong)."""
    return float(min(max(share, np.finfo(np.float64).tiny), 0.5))


def finish(
    params: Params,
    s: np.ndarray,
    mu: np.ndarray,
    sigma: np.ndarray,
    ok: np.ndarray,
    n: np.ndarray,
    reg_covar: float,
    reg_form: str,
    w_bg: float = 0.0,
) -> tuple[Params, list[int]]:
    """New parameters from an update's moments (weights ``s``, means ``mu``, unregularised
    covariances ``sigma``, ``ok`` False where collapsed): regularised, collapsed components
    re-seeded, Gaussian weights scaled to 1 - ``w_bg``. Returns (params, re-seeded indices)."""
    V = regularise(sigma, n, reg_covar, reg_form)
    ok = ok & is_pd(V) & (s > 0)
    w = np.where(ok, s, 0.0)
    if w.sum() <= 0:
        raise FloatingPointError("every mixture component collapsed")
    total = 1.0 - w_bg
    w = w / w.sum() * total
    reseeded: list[int] = []
    if not ok.all():
        w, mu, V, reseeded = reseed_collapsed(w, mu, V, ~ok, total)
    return params.with_gaussians(
        w, mu, V, w_bg if params.background is not None else None
    ), reseeded

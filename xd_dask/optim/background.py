"""The uniform background component's box (DESIGN.md 4d): the bulk of the data, padded.

The box sets the background's density, weight / volume(box), over each row's observed fields; a
row outside the box gets the same density (the kernels do not test membership). It is computed
once, from rows the fit already has at hand (all rows in memory; the k-means sample of a
catalogue), and then stays fixed; only the weight is fitted.

Per column the box spans the :data:`BOX_TRIM` and 1 - :data:`BOX_TRIM` order statistics of the
observed values, widened by :data:`BOX_PAD` of that width on each side (for a Gaussian column:
+-2.6 sigma widened to +-5.2 sigma). Not the plain min / max: the rows a background is for would
set it (one parallax of 1e30 mas makes a box of volume 1e30 and moves nothing), and the box also
confines the initial Gaussians (:func:`confine`), which k-means spreads over the absurd rows.
"""

from __future__ import annotations

import numpy as np

from xd_dask.params import Background

__all__ = ["BOX_PAD", "BOX_TRIM", "bounding_box", "confine", "initial_background"]

#: Fraction of the observed values of each column left outside the box on each side.
BOX_TRIM = 0.005
#: Each side of the box is moved out by this fraction of the box's width.
BOX_PAD = 0.5


def bounding_box(
    X: np.ndarray, pad: float = BOX_PAD, trim: float = BOX_TRIM
) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), each (D,): the box of the bulk of the rows X (n, D) (module docstring).

    A column whose bulk has a single value gets a width of max(1, |value|) before padding.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or not (~np.isnan(X)).any(axis=0).all():
        raise ValueError("a background box needs at least one observed value in every column")
    lo = np.nanquantile(X, trim, axis=0, method="lower")
    hi = np.nanquantile(X, 1.0 - trim, axis=0, method="higher")
    width = hi - lo
    width = np.where(width > 0, width, np.maximum(1.0, np.abs(lo)))
    if not np.all(np.isfinite(width)):
        raise ValueError("the bulk of the data is not finite; check for inf values")
    return lo - pad * width, hi + pad * width


def initial_background(X: np.ndarray, weight: float, pad: float = BOX_PAD) -> Background:
    """A :class:`Background` over the padded bounding box of X with the starting ``weight``."""
    if not (0.0 < weight <= 0.5):
        raise ValueError(f"background_weight must be in (0, 0.5], got {weight!r}")
    lo, hi = bounding_box(X, pad)
    return Background(weight, lo, hi)


def confine(
    means: np.ndarray, covariances: np.ndarray, background: Background
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Confine initial Gaussians to the background's box: means clipped into [lo, hi], standard
    deviations capped at half the box's width (V -> C V C with C = diag(min(1, cap / sd)), which
    keeps the correlations and positive definiteness).

    A start centred outside the data or wider than the data models one absurd row, not the data
    (k-means standardises by a spread that one row at 1e30 dominates); inside the box the
    background can take that row from the first iteration on.

    Returns (means (K, D), covariances (K, D, D), indices of the components changed).
    """
    lo, hi = np.asarray(background.lo), np.asarray(background.hi)
    cap = 0.5 * (hi - lo)
    m = np.clip(means, lo, hi)
    sd = np.sqrt(np.diagonal(covariances, axis1=1, axis2=2))  # (K, D)
    c = np.minimum(1.0, cap / np.where(sd > 0, sd, 1.0))  # (K, D)
    V = covariances * c[:, :, None] * c[:, None, :]
    changed = np.flatnonzero(np.any(m != means, axis=1) | np.any(c < 1.0, axis=1))
    return m, V, [int(j) for j in changed]

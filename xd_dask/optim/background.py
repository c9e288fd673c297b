"""The uniform background component's box (DESIGN.md 4d): the extent of the rows, without the
absurd ones.

The box sets the background's density, weight / volume(box), over each row's observed fields; a
row outside the box gets the same density (the kernels do not test membership). It is computed
once, from rows the fit already has at hand (all rows in memory; the k-means sample of a
catalogue), and then stays fixed; only the weight is fitted.

The box must follow the rows: its density has to beat a wide Gaussian on the outliers it is
for. Per column it spans the observed values' min and max, but no farther than :data:`BOX_PAD`
of the width between the :data:`BOX_TRIM` and 1 - :data:`BOX_TRIM` order statistics beyond
them: a uniform spread of outliers sets the box (10 % uniform over a 60-unit cube gives the
cube), one absurd row does not (a parallax of 1e30 mas would make a box of volume 1e30 in which
the background explains nothing). Measured: the former box (those order statistics padded by
half their width on each side, twice the outliers' extent here) lost to a Gaussian of weight 0.9
over all the clusters; this box gives the background its 10 %. The box also confines the initial
Gaussians (:func:`confine`).
"""

from __future__ import annotations

import numpy as np

from xd_dask.params import Background

__all__ = ["BOX_PAD", "BOX_TRIM", "bounding_box", "confine", "initial_background"]

#: Order statistics (on each side) that bound the bulk of each column ...
BOX_TRIM = 0.005
#: ... and the box reaches beyond them by at most this fraction of their distance (up to the
#: extreme value of the column).
BOX_PAD = 0.1


def bounding_box(
    X: np.ndarray, pad: float = BOX_PAD, trim: float = BOX_TRIM
) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), each (D,): the box of the rows X (n, D) (module docstring).

    A column whose bulk has a single value gets a width of max(1, |value|) around it.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or not (~np.isnan(X)).any(axis=0).all():
        raise ValueError("a background box needs at least one observed value in every column")
    lo = np.nanquantile(X, trim, axis=0, method="lower")
    hi = np.nanquantile(X, 1.0 - trim, axis=0, method="higher")
    width = hi - lo
    if not np.all(np.isfinite(width)):
        raise ValueError("the bulk of the data is not finite; check for inf values")
    flat = ~(width > 0)
    reach = pad * np.where(flat, np.maximum(1.0, np.abs(lo)), width)
    box_lo = np.maximum(np.nanmin(X, axis=0), lo - reach)
    box_hi = np.minimum(np.nanmax(X, axis=0), hi + reach)
    half = 0.5 * np.maximum(1.0, np.abs(lo))  # a column of one value: a box around it
    box_lo = np.where(flat, lo - half, box_lo)
    box_hi = np.where(flat, hi + half, box_hi)
    return box_lo, box_hi


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

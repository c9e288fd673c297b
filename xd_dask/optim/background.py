"""The uniform background component's box (DESIGN.md 4d): the data's bounding box, padded.

The box sets the background's density, weight / volume(box), over each row's observed fields; a
row outside the box gets the same density (the kernels do not test membership). It is computed
once, from rows the fit already has at hand (all rows in memory; the k-means sample of a
catalogue), and then stays fixed; only the weight is fitted.
"""

from __future__ import annotations

import numpy as np

from xd_dask.kernels import Background

__all__ = ["BOX_PAD", "bounding_box", "initial_background"]

#: Each side of the box is moved out by this fraction of the box's width.
BOX_PAD = 0.1


def bounding_box(X: np.ndarray, pad: float = BOX_PAD) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), each (D,): the per-column range of the observed values of X (n, D), padded.

    A column with a single distinct value gets a width of max(1, |value|) before padding.
    """
    X = np.asarray(X, dtype=np.float64)
    obs = ~np.isnan(X)
    if X.ndim != 2 or X.shape[0] == 0 or not obs.any(axis=0).all():
        raise ValueError("a background box needs at least one observed value in every column")
    lo = np.nanmin(X, axis=0)
    hi = np.nanmax(X, axis=0)
    width = hi - lo
    width = np.where(width > 0, width, np.maximum(1.0, np.abs(lo)))
    if not np.all(np.isfinite(width)):
        raise ValueError("the data's bounding box is not finite; check for inf values")
    return lo - pad * width, hi + pad * width


def initial_background(X: np.ndarray, weight: float, pad: float = BOX_PAD) -> Background:
    """A :class:`Background` over the padded bounding box of X with the starting ``weight``."""
    if not (0.0 < weight < 0.5):
        raise ValueError(f"background_weight must be in (0, 0.5), got {weight!r}")
    lo, hi = bounding_box(X, pad)
    return Background(weight, lo, hi)

"""Row-level train / held-out split decided by a hash of each row's id.

A row is held out when ``splitmix64(source_id) / 2**64 < fraction``. The decision depends on the
row's id only, so it is deterministic and independent of how the catalogue is partitioned, and
every partition (sky region) contributes both training and held-out rows - unlike holding out
whole files, which holds out whole sky regions when files are HEALPix-ordered.

The hashes (SplitMix64, salted hashes, the strata of stratified waves and the buckets of
``xd-dask shuffle``) live in :mod:`xd_dask.optim.strata`; the strata and buckets hash the id a
second time with a salt, so they are independent of the split and of each other.
"""

from __future__ import annotations

import numpy as np

from xd_dask.optim.strata import row_keys, salted, splitmix64, stratum_of

__all__ = ["SIDES", "holdout_mask", "row_keys", "salted", "side_mask", "splitmix64", "stratum_of"]

SIDES = ("train", "holdout")


def _threshold(fraction: float) -> int:
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"split fraction must be in [0, 1], got {fraction}")
    return int(float(fraction) * 2.0**64)


def holdout_mask(ids: np.ndarray, fraction: float) -> np.ndarray:
    """(n,) bool: True for the held-out rows, ``splitmix64(id) / 2**64 < fraction``."""
    thr = _threshold(fraction)
    if thr >= 2**64:
        return np.ones(np.shape(ids)[0] if np.ndim(ids) else 1, dtype=bool)
    return splitmix64(ids) < np.uint64(thr)


def side_mask(ids: np.ndarray, fraction: float, side: str) -> np.ndarray:
    """(n,) bool rows on ``side`` ("holdout": :func:`holdout_mask`; "train": its complement)."""
    if side not in SIDES:
        raise ValueError(f"split side must be one of {SIDES}, got {side!r}")
    mask = holdout_mask(ids, fraction)
    return mask if side == "holdout" else ~mask

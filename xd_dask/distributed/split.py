"""Row-level train / held-out split decided by a hash of each row's id.

A row is held out when ``splitmix64(source_id) / 2**64 < fraction``. The decision depends on the
row's id only, so it is deterministic and independent of how the catalogue is partitioned, and
every partition (sky region) contributes both training and held-out rows - unlike holding out
whole files, which holds out whole sky regions when files are HEALPix-ordered.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SIDES", "holdout_mask", "side_mask", "splitmix64"]

SIDES = ("train", "holdout")

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(ids: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser of ``ids + golden gamma`` (uint64, wrapping arithmetic).

    Parameters
    ----------
    ids : (n,) integers (int64 ids are reinterpreted as uint64).

    Returns
    -------
    (n,) uint64 hashes; ``splitmix64([0]) == [0xE220A8397B1DCDAF]`` (the first output of the
    reference SplitMix64 generator seeded with 0).
    """
    z = np.array(ids, copy=True).reshape(-1)
    z = z.view(np.uint64) if z.dtype == np.int64 else z.astype(np.uint64)
    with np.errstate(over="ignore"):
        z += _GAMMA
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


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

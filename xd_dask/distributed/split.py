"""Row-level decisions by a hash of each row's id: the train / held-out split, the hash strata of
stratified waves, and the output file of ``xd-dask shuffle``.

A row is held out when ``splitmix64(source_id) / 2**64 < fraction``. The decision depends on the
row's id only, so it is deterministic and independent of how the catalogue is partitioned, and
every partition (sky region) contributes both training and held-out rows - unlike holding out
whole files, which holds out whole sky regions when files are HEALPix-ordered.

Strata (:func:`stratum_of`) and shuffle buckets (:func:`salted`) hash the id a second time with a
salt (seed, purpose, epoch), so they are independent of the split and of each other. Without an
id column a row's key is its position (:func:`row_keys`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["SIDES", "holdout_mask", "row_keys", "salted", "side_mask", "splitmix64", "stratum_of"]

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


def row_keys(ids: np.ndarray, unit: int | None = None) -> np.ndarray:
    """(n,) uint64 hash keys of rows: ``splitmix64(ids)``; with ``unit`` (ids that are row
    positions within a file, no id column) the unit's hash is mixed in, so that row i of
    different files gets different keys."""
    keys = splitmix64(ids)
    if unit is not None:
        keys ^= splitmix64(np.array([unit + (1 << 40)], dtype=np.int64))[0]
    return keys


def salted(keys: np.ndarray, *salt: int) -> np.ndarray:
    """(n,) uint64: ``splitmix64(keys ^ h(salt))`` for non-negative integers ``salt`` (e.g.
    seed, purpose, epoch): a hash of the keys independent of the unsalted one."""
    h = np.uint64(0)
    for x in salt:
        h = splitmix64(np.array([int(x)], dtype=np.uint64) ^ h)[0]
    return splitmix64(np.asarray(keys, dtype=np.uint64) ^ h)


def stratum_of(keys: np.ndarray, n_strata: int, seed: int, epoch: int) -> np.ndarray:
    """(n,) int64 stratum in [0, n_strata) of each key for an epoch (hash strata of stratified
    waves: a stratum is a random 1 / n_strata of the rows, a different one every epoch)."""
    if int(n_strata) < 1:
        raise ValueError(f"n_strata must be >= 1, got {n_strata}")
    h = salted(keys, int(seed), 23, int(epoch)) >> np.uint64(11)  # 53 uniform bits
    return (h.astype(np.float64) * (2.0**-53 * int(n_strata))).astype(np.int64)

"""Hashes that decide about rows by their id: SplitMix64, salted hashes and the hash strata of
stratified waves (:class:`xd_dask.optim.loop.Batch` ``stratum``).

Every statistics source draws a stratum the same way, so a wave holds the same rows whether the
rows sit in memory (:class:`xd_dask.optim.arrays.ArrayStatistics`) or in a catalogue on a cluster
(:mod:`xd_dask.distributed.fit`): rows whose ``stratum_of(row_keys(id), S, seed, epoch) == s``.
Without an id column a row's key is its position (:func:`row_keys` with ``unit``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["EpochStrata", "row_keys", "salted", "splitmix64", "stratum_of", "waves_per_epoch"]

#: Default waves per epoch (updates per pass over the rows) ...
WAVES_PER_EPOCH = 64
#: ... but a wave holds at least this many rows per component on average.
MIN_WAVE_ROWS_PER_COMPONENT = 100


def waves_per_epoch(n_rows: int, n_components: int, requested: int | None = None) -> int:
    """Waves (updates) per epoch: ``requested`` (``fit.waves_per_epoch``) when given, else
    :data:`WAVES_PER_EPOCH`, fewer when a wave would hold under
    :data:`MIN_WAVE_ROWS_PER_COMPONENT` rows per component (at least 1)."""
    if requested:
        return int(requested)
    per_wave = MIN_WAVE_ROWS_PER_COMPONENT * int(n_components)
    return max(1, min(WAVES_PER_EPOCH, int(n_rows) // per_wave))


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


class EpochStrata:
    """The strata of some rows (ids (n,)) in the epoch last asked for, computed once for the
    epoch's waves: what a source that holds its rows (in memory, or a block persisted on a
    worker) keeps, so that a wave costs a comparison, not a hash of every row."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids
        self._key: tuple | None = None
        self._strata: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self._strata is None else int(self._strata.nbytes)

    def __call__(self, unit: int | None, n_strata: int, seed: int, epoch: int) -> np.ndarray:
        """(n,) int32 ``stratum_of(row_keys(ids, unit), n_strata, seed, epoch)``."""
        key = (unit, int(n_strata), int(seed), int(epoch))
        if self._strata is None or self._key != key:
            keys = row_keys(self.ids, unit)
            self._strata = stratum_of(keys, n_strata, seed, epoch).astype(np.int32)
            self._key = key
        return self._strata

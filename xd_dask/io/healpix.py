"""HEALPix NESTED pixel indices (Gorski et al. 2005), as Gaia uses them in ``source_id``.

Gaia encodes the level-12 nested HEALPix index of a source in its ``source_id``:
``source_id // 2**35`` (level N: ``source_id >> (59 - 2N)``). The DR3 bulk files are named by the
first and last level-8 index they hold. Only what the catalogue code needs is here: the
angle -> nested-pixel map (vectorised NumPy, no healpy dependency) and the source_id helpers.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from xd_dask.codecache import numba_cache_ok

_CACHE = numba_cache_ok(__file__)  # Numba's on-disk cache only where no one else writes

__all__ = ["ang2pix_nest", "healpix_from_source_id", "n_pixels", "GAIA_LEVEL"]

#: HEALPix level encoded in Gaia source_id.
GAIA_LEVEL = 12


def n_pixels(level: int) -> int:
    """Number of pixels at ``level`` (nside = 2**level): 12 * 4**level."""
    return 12 * 4**level


def healpix_from_source_id(source_id: np.ndarray, level: int = GAIA_LEVEL) -> np.ndarray:
    """Nested HEALPix index at ``level`` (<= 12) from Gaia source_id (int64 array)."""
    if not 0 <= level <= GAIA_LEVEL:
        raise ValueError(f"level must be in 0..{GAIA_LEVEL}, got {level}")
    return np.asarray(source_id, dtype=np.int64) >> (59 - 2 * level)


def _spread_table() -> np.ndarray:
    """spread[x] puts bit k of the byte x at bit 2k (for interleaving x and y)."""
    x = np.arange(256, dtype=np.int64)
    out = np.zeros(256, dtype=np.int64)
    for k in range(8):
        out |= ((x >> k) & 1) << (2 * k)
    return out


_SPREAD = _spread_table()


def _spread_bits(v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(v)
    for shift in range(0, 32, 8):
        out |= _SPREAD[(v >> shift) & 0xFF] << (2 * shift)
    return out


def ang2pix_nest(level: int, ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Nested HEALPix pixel index at ``level`` of positions (ra, dec) in degrees.

    Parameters
    ----------
    level : HEALPix order (nside = 2**level), 0..29.
    ra_deg, dec_deg : (n,) right ascension and declination in degrees.

    Returns
    -------
    (n,) int64 pixel indices in [0, 12 * 4**level).
    """
    if not 0 <= level <= 29:
        raise ValueError(f"level must be in 0..29, got {level}")
    nside = 1 << level
    ra = np.asarray(ra_deg, dtype=np.float64)
    dec = np.asarray(dec_deg, dtype=np.float64)
    z = np.sin(np.radians(dec))
    za = np.abs(z)
    tt = np.mod(np.radians(ra), 2 * np.pi) * (2 / np.pi)  # in [0, 4)
    tt = np.where(tt >= 4.0, 0.0, tt)

    # Equatorial region |z| <= 2/3.
    temp1 = nside * (0.5 + tt)
    temp2 = nside * z * 0.75
    jp = (temp1 - temp2).astype(np.int64)
    jm = (temp1 + temp2).astype(np.int64)
    ifp = jp >> level
    ifm = jm >> level
    face_eq = np.where(ifp == ifm, ifp | 4, np.where(ifp < ifm, ifp, ifm + 8))
    ix_eq = jm & (nside - 1)
    iy_eq = nside - (jp & (nside - 1)) - 1

    # Polar caps.
    ntt = np.minimum(tt.astype(np.int64), 3)
    tp = tt - ntt
    tmp = nside * np.sqrt(3 * (1 - za))
    jp_p = np.minimum((tp * tmp).astype(np.int64), nside - 1)
    jm_p = np.minimum(((1.0 - tp) * tmp).astype(np.int64), nside - 1)
    north = z >= 0
    face_p = np.where(north, ntt, ntt + 8)
    ix_p = np.where(north, nside - jm_p - 1, jp_p)
    iy_p = np.where(north, nside - jp_p - 1, jm_p)

    eq = za <= 2.0 / 3.0
    face = np.where(eq, face_eq, face_p)
    ix = np.where(eq, ix_eq, ix_p)
    iy = np.where(eq, iy_eq, iy_p)
    return (face << (2 * level)) + _spread_bits(ix) + (_spread_bits(iy) << 1)


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _spread_one(v):
    out = 0
    for k in range(30):
        out |= ((v >> k) & 1) << (2 * k)
    return out


@numba.njit(cache=_CACHE, nogil=True)
def ang2pix_nest_one(level, ra_deg, dec_deg):
    """Scalar (compiled) twin of :func:`ang2pix_nest` for use inside Numba loops."""
    nside = 1 << level
    z = math.sin(dec_deg * (math.pi / 180.0))
    za = abs(z)
    tt = ((ra_deg * (math.pi / 180.0)) % (2.0 * math.pi)) * (2.0 / math.pi)
    if tt >= 4.0:
        tt = 0.0
    if za <= 2.0 / 3.0:
        temp1 = nside * (0.5 + tt)
        temp2 = nside * z * 0.75
        jp = np.int64(temp1 - temp2)
        jm = np.int64(temp1 + temp2)
        ifp = jp >> level
        ifm = jm >> level
        if ifp == ifm:
            face = ifp | 4
        elif ifp < ifm:
            face = ifp
        else:
            face = ifm + 8
        ix = jm & (nside - 1)
        iy = nside - (jp & (nside - 1)) - 1
    else:
        ntt = min(np.int64(tt), 3)
        tp = tt - ntt
        tmp = nside * math.sqrt(3.0 * (1.0 - za))
        jp = min(np.int64(tp * tmp), nside - 1)
        jm = min(np.int64((1.0 - tp) * tmp), nside - 1)
        if z >= 0:
            face = ntt
            ix = nside - jm - 1
            iy = nside - jp - 1
        else:
            face = ntt + 8
            ix = jp
            iy = jm
    return (face << (2 * level)) + _spread_one(ix) + (_spread_one(iy) << 1)

"""The Gaia DR3 columns a synthetic catalogue holds, named after the packaged ``gaia_dr3`` schema.

Column names, feature units and photometric zero points come from the schema (what the reader will
look for); dtypes, nullability and the archive's spelling of units are the generator's own (Gaia
DR3's): float64 positions, parallax and proper motions; float32 errors, correlations and
photometry; int16 ``astrometric_params_solved``. Records are kept in a spill-friendly dtype
(:data:`RECORD`) until they are written.
"""

from __future__ import annotations

import numpy as np

from xd_dask.io.schema import load_schema

__all__ = ["GAIA_COLUMNS", "RECORD", "SCHEMA"]

#: The schema whose columns are written (features in the generator's order: ra, dec, parallax,
#: pmra, pmdec, bp_rp, phot_g_mean_mag).
SCHEMA = load_schema("gaia_dr3")
#: The five astrometric features, then the colour and the magnitude.
ASTROMETRY = SCHEMA.features[:5]
COLOUR, MAGNITUDE = SCHEMA.features[5:7]
MAS_PER_DEG = 3.6e6
#: Not a schema column: 31 for 5-parameter solutions, 3 for 2-parameter ones.
SOLVED = "astrometric_params_solved"

_NOISE = dict(zip(SCHEMA.features, SCHEMA.noise, strict=True))
VALUE = dict(zip(SCHEMA.features, SCHEMA.columns, strict=True))
ERROR = {f: _NOISE[f].columns[0] for f in ASTROMETRY}
ID = SCHEMA.id_column
BP_FOE, RP_FOE = _NOISE[COLOUR].columns
(G_FOE,) = _NOISE[MAGNITUDE].columns
#: Zero-point terms (mag) of the photometric errors.
ZP_BP, ZP_RP = _NOISE[COLOUR].mag_floors
(ZP_G,) = _NOISE[MAGNITUDE].mag_floors

#: (a, b) index pairs of the astrometric correlations, in Gaia's order.
PAIR_INDEX = [(a, b) for a in range(5) for b in range(a + 1, 5)]
_CORR = {c.features: c.column for c in SCHEMA.correlations}
CORR_NAMES = [_CORR[(ASTROMETRY[a], ASTROMETRY[b])] for a, b in PAIR_INDEX]

_ARCHIVE_UNIT = {"mas/yr": "mas.yr**-1"}  # the archive's spelling of the schema's units


def _unit(unit: str) -> str:
    return _ARCHIVE_UNIT.get(unit, unit)


def _gaia_columns() -> list[tuple[str, str, str, bool]]:
    units = dict(zip(SCHEMA.features, SCHEMA.units, strict=True))
    cols = [(ID, "i8", "", False)]
    for a, f in enumerate(ASTROMETRY):  # parallax and proper motions are null in 2-p solutions
        cols.append((VALUE[f], "f8", _unit(units[f]), a >= 2))
        cols.append((ERROR[f], "f4", _unit(_NOISE[f].error_unit), a >= 2))
    cols += [(c, "f4", "", p > 0) for p, c in enumerate(CORR_NAMES)]  # ra_dec_corr: never null
    return [
        *cols,
        (SOLVED, "i2", "", False),
        (G_FOE, "f4", "", False),
        (VALUE[MAGNITUDE], "f4", units[MAGNITUDE], False),
        (BP_FOE, "f4", "", True),
        (RP_FOE, "f4", "", True),
        (VALUE[COLOUR], "f4", units[COLOUR], True),
    ]


#: (name, numpy dtype, unit, nullable) of the columns written, in Gaia DR3 order.
GAIA_COLUMNS: list[tuple[str, str, str, bool]] = _gaia_columns()


def _record_dtype() -> np.dtype:
    """Spill record: fields sorted by size (8-, 4-, then 2-byte) and padded to a multiple of 8
    bytes, so every field is aligned and a record buffer can be read as uint64 / uint32 / uint16
    words."""
    by_size = sorted(GAIA_COLUMNS, key=lambda c: -np.dtype(c[1]).itemsize)
    offsets = np.cumsum([0] + [np.dtype(c[1]).itemsize for c in by_size])
    return np.dtype(
        {
            "names": [c[0] for c in by_size],
            "formats": [c[1] for c in by_size],
            "offsets": [int(o) for o in offsets[:-1]],
            "itemsize": int(-(-offsets[-1] // 8) * 8),
        }
    )


RECORD = _record_dtype()

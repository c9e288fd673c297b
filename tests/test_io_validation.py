"""Physical ranges, dtype overflow, error floors and duplicate ids (issue 8, point 4).

Each absurd-but-finite input is planted in real Gaia DR3 rows; under on_bad="error" the message
names the file, the row, the id and the column, under on_bad="drop" the row is counted under its
reason and the other rows are unchanged, in float64 and float32. Every real Gaia row shipped with
the project passes the packaged schema's ranges.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.shared_data import GAIA_DIR
from xd_dask.distributed.config import FitConfig, resolve_schema
from xd_dask.io import (
    BAD_REASONS,
    CatalogError,
    build_covariance,
    load_schema,
    plain_schema,
    read_partition,
)
from xd_dask.io.schema import schema_from_dict

DATA = Path(__file__).parent / "data"
SHARED = GAIA_DIR
SAMPLE = DATA / "gaia_dr3_allsky_sample.parquet"  # 18 valid DR3 rows, sorted by source_id
DTYPES = [np.float64, np.float32]
K = 2.5 / math.log(10.0)


@pytest.fixture(scope="module")
def base() -> pa.Table:
    return pq.read_table(SAMPLE)


def _set(table: pa.Table, column: str, row: int, value: float) -> pa.Table:
    """``table`` with one value replaced (the column becomes float64 so any value fits)."""
    i = table.column_names.index(column)
    vals = table.column(i).to_pylist()
    vals[row] = value
    return table.set_column(i, pa.field(column, pa.float64()), pa.array(vals, pa.float64()))


def _check_error(err: CatalogError, path: Path, row: int, sid: int, column: str, reason: str):
    msg = str(err)
    assert str(path) in msg and f"row {row} " in msg and f"source_id={sid}" in msg, msg
    assert repr(column) in msg, msg
    assert (err.path, err.row, err.row_id, err.column, err.reason) == (
        str(path),
        row,
        sid,
        column,
        reason,
    )


def _check_dropped(blk, clean, bad_rows: list[int], reason: str, n: int | None = None):
    assert blk.dropped[reason] == (len(bad_rows) if n is None else n)
    assert sum(blk.dropped.values()) == blk.dropped[reason]
    keep = [i for i in range(clean.n_rows) if i not in bad_rows]
    np.testing.assert_array_equal(blk.ids, clean.ids[keep])
    np.testing.assert_array_equal(blk.X, clean.X[keep])
    np.testing.assert_array_equal(blk.X_cov, clean.X_cov[keep])


# (column, absurd value, reason) under the packaged Gaia schema
ABSURD = [
    ("dec", 500.0, "value_out_of_range"),
    ("ra", -0.5, "value_out_of_range"),
    ("parallax", 1e30, "value_out_of_range"),
    ("pmdec", -3e4, "value_out_of_range"),
    ("phot_g_mean_mag", 99.0, "value_out_of_range"),
    ("parallax_error", 1e25, "error_out_of_range"),
    ("ra_error", 2e4, "error_out_of_range"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize(("column", "value", "reason"), ABSURD)
def test_absurd_value_is_named_or_counted(tmp_path, base, column, value, reason, dtype):
    row = 5
    path = tmp_path / "bad.parquet"
    pq.write_table(_set(base, column, row, value), path)
    with pytest.raises(CatalogError) as err:
        read_partition(path, dtype=dtype)
    sid = base.column("source_id")[row].as_py()
    _check_error(err.value, path, row, sid, column, reason)
    assert "min =" in str(err.value) or "error_max =" in str(err.value)  # the bound is quoted
    clean = read_partition(SAMPLE, dtype=dtype)
    _check_dropped(read_partition(path, dtype=dtype, on_bad="drop"), clean, [row], reason)


# Without schema ranges the dtype is the last line of defence. Expected per dtype, from IEEE
# arithmetic: float32 squares overflow above 3.4e38 (|x| > 1.8e19) and variances below 1.2e-38
# are not normal numbers; float64: 1.8e308 (|x| > 1.3e154) and 2.2e-308.
REPRESENTABLE = [
    # column, value, bad in float64, bad in float32
    ("parallax_error", 1e25, False, True),  # the measured failure: nan log-likelihood in float32
    ("parallax", 1e30, False, True),
    ("parallax_error", 1e-25, False, True),  # variance 1e-50 underflows float32
    ("parallax_error", 1e200, True, True),
    ("pmra", -1e160, True, True),
    ("parallax_error", 1e19, False, False),  # variance 1e38: still finite in float32
]


@pytest.mark.parametrize(("column", "value", "bad64", "bad32"), REPRESENTABLE)
def test_squares_that_overflow_the_working_dtype(tmp_path, base, column, value, bad64, bad32):
    schema = plain_schema(
        ["parallax", "pmra", "pmdec"],
        ["parallax_error", "pmra_error", "pmdec_error"],
        [("parallax", "pmra", "parallax_pmra_corr"), ("pmra", "pmdec", "pmra_pmdec_corr")],
        id_column="source_id",
    )
    row = 7
    path = tmp_path / "big.parquet"
    pq.write_table(_set(base, column, row, value), path)
    sid = base.column("source_id")[row].as_py()
    for dtype, bad in ((np.float64, bad64), (np.float32, bad32)):
        fi = np.finfo(dtype)
        # the reference: what storing the row's square in this dtype would give
        with np.errstate(over="ignore", under="ignore"):
            sq = np.array(value, np.float64) ** 2
        assert bad == (not sq <= fi.max or sq < fi.tiny)
        if bad:
            with pytest.raises(CatalogError) as err:
                read_partition(path, schema, dtype=dtype)
            _check_error(err.value, path, row, sid, column, "not_representable")
            assert dtype.__name__ in str(err.value)
            blk = read_partition(path, schema, dtype=dtype, on_bad="drop")
            assert blk.dropped["not_representable"] == 1 and blk.n_rows == base.num_rows - 1
        else:
            blk = read_partition(path, schema, dtype=dtype)
            assert blk.n_rows == base.num_rows
        # whatever was accepted is finite, with positive normal variances, in the working dtype
        assert np.isfinite(blk.X_cov).all() and blk.X_cov.dtype == dtype
        diag = np.diagonal(blk.X_cov, axis1=1, axis2=2)
        assert (diag[~np.isnan(blk.X)] >= fi.tiny).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_duplicate_ids_within_a_partition(tmp_path, base, dtype):
    # rows 2 and 5 appear again at rows 18 and 19 (a file concatenated with part of itself)
    table = pa.concat_tables([base, base.take([2, 5])])
    path = tmp_path / "dup.parquet"
    pq.write_table(table, path, row_group_size=base.num_rows)
    sid = base.column("source_id")[2].as_py()
    with pytest.raises(CatalogError) as err:
        read_partition(path, dtype=dtype)
    _check_error(err.value, path, 18, sid, "source_id", "duplicate_id")
    assert "row 2 has the same source_id" in str(err.value)
    clean = read_partition(SAMPLE, dtype=dtype)
    blk = read_partition(path, dtype=dtype, on_bad="drop")
    assert blk.n_read == 20 and blk.dropped["duplicate_id"] == 2
    np.testing.assert_array_equal(blk.ids, clean.ids)  # the first occurrences are kept
    np.testing.assert_array_equal(blk.X_cov, clean.X_cov)
    # a row group read alone holds no duplicate: the check covers the rows read in one call
    assert read_partition(path, dtype=dtype, row_groups=[1]).n_rows == 2
    # a sorted file (ids in order, duplicates adjacent) is caught too
    pq.write_table(table.sort_by("source_id"), path)
    assert read_partition(path, dtype=dtype, on_bad="drop").dropped["duplicate_id"] == 2


def test_duplicate_of_a_bad_row_keeps_the_valid_copy(tmp_path, base):
    table = pa.concat_tables([_set(base, "dec", 2, 500.0), _set(base, "dec", 2, 500.0).take([2])])
    table = _set(table, "dec", 18, base.column("dec")[2].as_py())  # the copy is valid
    path = tmp_path / "dup.parquet"
    pq.write_table(table, path)
    blk = read_partition(path, on_bad="drop")
    assert blk.dropped["value_out_of_range"] == 1 and blk.dropped["duplicate_id"] == 0
    assert sorted(blk.ids.tolist()) == sorted(base.column("source_id").to_pylist())


def test_error_floor_is_an_independent_noise_term():
    d = {
        "name": "floors",
        "feature": [
            {"name": "ra", "unit": "deg", "error": "ra_err", "error_unit": "mas"}
            | {"error_divide_by_cos": "dec", "error_floor": 0.5},
            {"name": "dec", "unit": "deg", "error": "dec_err", "error_unit": "mas"},
            {"name": "plx", "unit": "mas", "error": "plx_err", "error_floor": 0.1},
            {"name": "g", "unit": "mag", "flux_over_error": ["g_foe"], "mag_floor": [0.003]}
            | {"error_floor": 0.02},
        ],
        "correlation": [
            {"features": ["ra", "dec"], "column": "ra_dec_corr"},
            {"features": ["ra", "plx"], "column": "ra_plx_corr"},
        ],
    }
    schema = schema_from_dict(d)
    data = {
        "ra": [10.0, 20.0],
        "dec": [60.0, 0.0],
        "plx": [1.0, 2.0],
        "g": [15.0, 16.0],
        "ra_err": [1.2, 0.4],
        "dec_err": [0.9, 0.3],
        "plx_err": [0.5, 0.0],  # row 1: a zero error, made usable by the floor
        "g_foe": [100.0, 50.0],
        "ra_dec_corr": [0.3, -0.2],
        "ra_plx_corr": [-0.1, 0.4],
    }
    res = build_covariance(data, schema)
    assert res.reason.tolist() == [0, 0]
    mas = 1 / 3.6e6
    for i, cosd in enumerate([0.5, 1.0]):
        s_ra = data["ra_err"][i] * mas / cosd  # catalogue sigmas (feature units)
        s_dec = data["dec_err"][i] * mas
        s_plx = data["plx_err"][i]
        S = res.X_cov[i]
        np.testing.assert_allclose(S[0, 0], s_ra**2 + (0.5 * mas / cosd) ** 2, rtol=1e-13)
        np.testing.assert_allclose(S[1, 1], s_dec**2, rtol=1e-13)
        np.testing.assert_allclose(S[2, 2], s_plx**2 + 0.1**2, rtol=1e-13)
        g = (K / data["g_foe"][i]) ** 2 + 0.003**2 + 0.02**2
        np.testing.assert_allclose(S[3, 3], g, rtol=1e-13)
        # correlations couple the catalogue errors only
        np.testing.assert_allclose(S[0, 1], data["ra_dec_corr"][i] * s_ra * s_dec, rtol=1e-13)
        np.testing.assert_allclose(S[0, 2], data["ra_plx_corr"][i] * s_ra * s_plx, rtol=1e-13)
        assert S[0, 3] == S[2, 3] == S[1, 2] == 0.0
        np.linalg.cholesky(S)
    # without the floor, the zero error is not positive definite
    d["feature"][2].pop("error_floor")
    res = build_covariance(data, schema_from_dict(d))
    assert BAD_REASONS[res.reason[1]] == "not_positive_definite" and res.reason[0] == 0


def test_new_keys_round_trip_through_a_checkpoint():
    d = load_schema().to_dict()
    d["feature"][2]["error_floor"] = 0.02
    d["feature"][2]["error_min"] = 0.001
    schema = schema_from_dict(d)
    assert schema.value_range(1) == (-90.0, 90.0) and schema.noise[2].error_range == (0.001, 100)
    assert schema_from_dict(schema.to_dict()) == schema
    cfg = FitConfig(catalog="c", n_components=2, schema=schema)
    spec = json.loads(json.dumps(cfg.to_dict()))["schema"]
    assert resolve_schema(spec) == schema
    # a schema without ranges keeps none (no inf in the JSON)
    plain = plain_schema(["a"], ["a_err"])
    assert plain.value_ranges == () and "max" not in json.dumps(plain.to_dict())


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_every_real_gaia_row_passes_the_packaged_ranges(dtype):
    schema = load_schema()
    assert all(
        math.isfinite(lo) and math.isfinite(hi)
        for lo, hi in (schema.value_range(j) for j in range(schema.n_features))
    )
    files = sorted(DATA.glob("gaia_*.parquet")) + sorted(SHARED.glob("*.parquet"))
    n = 0
    for path in files:
        blk = read_partition(path, schema, dtype=dtype)  # on_bad="error": any bad row raises
        n += blk.n_rows
    assert n >= 71  # tests/data alone; 4,461 with the shared samples


def test_duplicate_finder_equals_a_pairwise_loop():
    from xd_dask.io.rows import later_duplicates as _later_duplicates  # noqa: PLC0415

    rng = np.random.default_rng(8)
    for n, span in ((0, 1), (1, 1), (200, 50), (300, 10**18), (257, 3)):
        ids = rng.integers(-span, span, n) if n else np.zeros(0, np.int64)
        valid = rng.random(n) > 0.2
        ref = [i for i in range(n) if valid[i] and any(valid[:i] & (ids[:i] == ids[i]))]
        assert _later_duplicates(ids, valid).tolist() == ref
        assert _later_duplicates(np.sort(ids), np.ones(n, bool)).size == n - np.unique(ids).size

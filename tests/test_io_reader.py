"""Reader validation policy (error | drop), unreadable files, column matching, fragments."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from xd_dask.io import BAD_REASONS, CatalogError, load_schema, read_partition
from xd_dask.io.schema import schema_from_dict

DATA = Path(__file__).parent / "data"
FEATURES = ["ra", "dec", "parallax", "pmra", "pmdec", "bp_rp", "phot_g_mean_mag"]


@pytest.fixture(scope="module")
def base() -> pa.Table:
    """18 real, valid DR3 rows with the schema's columns."""
    return pq.read_table(DATA / "gaia_dr3_allsky_sample.parquet")


def _set(table: pa.Table, column: str, row: int, value) -> pa.Table:
    i = table.column_names.index(column)
    vals = table.column(column).to_pylist()
    vals[row] = value
    return table.set_column(i, table.schema.field(i), pa.array(vals, table.schema.field(i).type))


# (column, row, value, reason, column named in the message)
CORRUPTIONS = [
    ("ra", 1, float("inf"), "nonfinite_value", "ra"),
    ("parallax", 2, float("nan"), "nonfinite_value", "parallax"),
    ("parallax_error", 3, None, "nonfinite_error", "parallax_error"),
    ("pmra_error", 4, -0.1, "negative_error", "pmra_error"),
    ("phot_g_mean_flux_over_error", 5, 0.0, "negative_error", "phot_g_mean_flux_over_error"),
    ("ra_dec_corr", 6, 1.5, "bad_correlation", "ra_dec_corr"),
    ("pmra_pmdec_corr", 7, None, "bad_correlation", "pmra_pmdec_corr"),
    ("dec_error", 9, 0.0, "not_positive_definite", "dec_error"),
    ("source_id", 11, None, "missing_id", "source_id"),
    # physical ranges of the packaged schema (issue 8): absurd but finite values
    ("dec", 12, 500.0, "value_out_of_range", "dec"),
    ("parallax_error", 13, 1e25, "error_out_of_range", "parallax_error"),
    ("parallax", 14, 1e30, "value_out_of_range", "parallax"),
]


def _not_pd(table: pa.Table, row: int) -> pa.Table:
    # every |corr| < 1 but the (ra, dec, parallax) correlation matrix has det < 0
    for col, v in (("ra_dec_corr", 0.9), ("ra_parallax_corr", 0.9), ("dec_parallax_corr", -0.9)):
        table = _set(table, col, row, v)
    return table


def _all_missing(table: pa.Table, row: int) -> pa.Table:
    for col in FEATURES:
        table = _set(table, col, row, None)
    return table


def _write(table: pa.Table, path: Path, **kw) -> Path:
    pq.write_table(table, path, **kw)
    return path


@pytest.mark.parametrize(("column", "row", "value", "reason", "named"), CORRUPTIONS)
def test_each_bad_value_raises_naming_file_row_column(
    tmp_path, base, column, row, value, reason, named
):
    path = _write(_set(base, column, row, value), tmp_path / "bad.parquet")
    with pytest.raises(CatalogError) as err:
        read_partition(path)
    msg = str(err.value)
    sid = base.column("source_id")[row].as_py() if reason != "missing_id" else "null"
    assert str(path) in msg and f"row {row} " in msg and f"source_id={sid}" in msg
    assert repr(named) in msg
    assert err.value.reason == reason and err.value.row == row and err.value.column == named
    assert err.value.__cause__ is None  # no chained pyarrow traceback


def test_not_positive_definite_and_all_missing_raise(tmp_path, base):
    path = _write(_not_pd(base, 8), tmp_path / "pd.parquet")
    with pytest.raises(CatalogError, match=r"row 8 .*not positive definite") as err:
        read_partition(path)
    assert err.value.reason == "not_positive_definite" and "ra_dec_corr" in str(err.value)
    path = _write(_all_missing(base, 10), tmp_path / "miss.parquet")
    with pytest.raises(CatalogError, match="row 10 .*every feature is missing"):
        read_partition(path)


def test_drop_counts_every_reason(tmp_path, base):
    table = base
    for column, row, value, _, _ in CORRUPTIONS:
        table = _set(table, column, row, value)
    table = _all_missing(_not_pd(table, 8), 10)
    path = _write(table, tmp_path / "bad.parquet")
    blk = read_partition(path, on_bad="drop")
    assert blk.dropped == {
        "nonfinite_value": 2,
        "nonfinite_error": 1,
        "negative_error": 2,
        "bad_correlation": 2,
        "not_positive_definite": 2,
        "no_observed_fields": 1,
        "missing_id": 1,
        "value_out_of_range": 2,
        "error_out_of_range": 1,
        "not_representable": 0,
        "duplicate_id": 0,
        "missing_input": 0,  # reasons of projected schemas (test_io_projection.py)
        "nonpositive_parallax": 0,
        "not_selected": 0,  # rows outside a schema [selection] (test_io_selection.py)
    }
    assert set(blk.dropped) == set(BAD_REASONS[1:])
    bad = {r for _, r, _, _, _ in CORRUPTIONS} | {8, 10}
    good = [i for i in range(base.num_rows) if i not in bad]
    ref = read_partition(_write(base, tmp_path / "good.parquet"))
    assert blk.n_read == base.num_rows and blk.n_rows == len(good)
    np.testing.assert_array_equal(blk.ids, ref.ids[good])
    np.testing.assert_array_equal(blk.X, ref.X[good])
    np.testing.assert_array_equal(blk.X_cov, ref.X_cov[good])


def test_clean_file_reports_zero_counts(tmp_path, base):
    blk = read_partition(_write(base, tmp_path / "ok.parquet"), on_bad="drop")
    assert blk.dropped == dict.fromkeys(BAD_REASONS[1:], 0) and blk.n_rows == base.num_rows


def test_nan_is_null_option(tmp_path, base):
    path = _write(_set(base, "parallax", 2, float("nan")), tmp_path / "nan.parquet")
    with pytest.raises(CatalogError, match="nan_is_null"):
        read_partition(path)
    d = load_schema().to_dict()
    d["nan_is_null"] = True
    blk = read_partition(path, schema_from_dict(d))
    assert np.isnan(blk.X[2, 2]) and not np.isnan(blk.X[2, 3])
    assert blk.X_cov[2, 2].tolist() == [0.0] * 7 and blk.X_cov[2, 3, 3] > 0


def test_truncated_parquet_is_a_clear_error(tmp_path, base):
    path = _write(base, tmp_path / "GaiaSource_000000-000001.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CatalogError, match="not a readable Parquet file") as err:
        read_partition(path)
    assert str(path) in str(err.value) and err.value.__cause__ is None
    path.write_bytes(b"")
    with pytest.raises(CatalogError, match=str(path)):
        read_partition(path)


def test_missing_and_unreadable_inputs(tmp_path, base):
    path = _write(base.drop_columns(["pmra_error"]), tmp_path / "nocol.parquet")
    with pytest.raises(CatalogError, match=r"missing required column\(s\) \['pmra_error'\]") as e:
        read_partition(path)
    assert str(path) in str(e.value) and e.value.column == "pmra_error"
    with pytest.raises(CatalogError, match="no such file"):
        read_partition(tmp_path / "nope.parquet")
    t = base.set_column(0, "source_id", pa.array([str(x) for x in range(base.num_rows)]))
    with pytest.raises(CatalogError, match="id column 'source_id' has type string"):
        read_partition(_write(t, tmp_path / "strid.parquet"))


def test_case_insensitive_columns_and_ambiguity(tmp_path, base):
    upper = base.rename_columns([c.upper() for c in base.column_names])
    a = read_partition(_write(upper, tmp_path / "upper.parquet"))
    b = read_partition(_write(base, tmp_path / "lower.parquet"))
    np.testing.assert_array_equal(a.X_cov, b.X_cov)
    np.testing.assert_array_equal(a.ids, b.ids)
    amb = base.rename_columns(["RA" if c == "ra" else c for c in base.column_names])
    amb = amb.append_column("Ra", base.column("ra"))
    with pytest.raises(CatalogError, match="ambiguous"):
        read_partition(_write(amb, tmp_path / "amb.parquet"))


def test_row_groups_filesystems_and_dtype(tmp_path, base):
    path = _write(base, tmp_path / "rg.parquet", row_group_size=5)
    full = read_partition(path)
    frag = read_partition(path, row_groups=[1, 3])
    rows = list(range(5, 10)) + list(range(15, 18))
    np.testing.assert_array_equal(frag.X_cov, full.X_cov[rows])
    np.testing.assert_array_equal(frag.ids, full.ids[rows])
    for fs in (fsspec.filesystem("file"), pafs.LocalFileSystem()):
        other = read_partition(str(path), filesystem=fs, row_groups=[3])
        np.testing.assert_array_equal(other.X, full.X[15:])
    mem = fsspec.filesystem("memory")
    with mem.open("/cat/rg.parquet", "wb") as fh:
        fh.write(path.read_bytes())
    np.testing.assert_array_equal(read_partition("/cat/rg.parquet", filesystem=mem).X, full.X)
    f32 = read_partition(path, dtype=np.float32)
    assert f32.X_cov.dtype == np.float32
    np.testing.assert_array_equal(f32.X_cov, full.X_cov.astype(np.float32))
    with pytest.raises(CatalogError, match="out of range"):
        read_partition(path, row_groups=[4])


def test_bad_row_in_a_fragment_is_named_by_its_file_row(tmp_path, base):
    path = _write(_set(base, "pmdec_error", 7, -1.0), tmp_path / "rg.parquet", row_group_size=5)
    with pytest.raises(CatalogError, match=r"row 7 \(source_id="):
        read_partition(path, row_groups=[1])
    with pytest.raises(CatalogError, match=r"row 7 \(source_id="):
        read_partition(path, row_groups=[0, 1])
    read_partition(path, row_groups=[0, 2])  # the bad row is not in these groups


def test_plain_schema_without_ids_numbers_rows(tmp_path):
    from xd_dask.io import plain_schema

    t = pa.table({"a": [1.0, 2.0, 3.0, 4.0], "ea": [0.1, 0.1, -0.1, 0.1]})
    path = _write(t, tmp_path / "p.parquet", row_group_size=2)
    sch = plain_schema(["a"], ["ea"])
    with pytest.raises(CatalogError, match=r"row 2 \(row=2\): column 'ea': negative error"):
        read_partition(path, sch)
    blk = read_partition(path, sch, on_bad="drop", row_groups=[1])
    assert blk.ids.tolist() == [3] and blk.dropped["negative_error"] == 1

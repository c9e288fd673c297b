"""ingest: Gaia ECSV (gzip) -> Parquet equals an independently parsed copy; bad inputs."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from xd_dask.io import CatalogError, load_schema, read_partition
from xd_dask.io.ingest import ingest

ECSV = Path(__file__).parent / "data" / "gaia_dr3_archive_5rows.ecsv"
BULK_NAME = "GaiaSource_000000-003111.csv.gz"
TYPES = {
    "int16": pa.int16(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "string": pa.string(),
}


@pytest.fixture
def bulk(tmp_path) -> Path:
    """The archive sample as a DR3 bulk file would be stored: gzip ECSV named by HEALPix range."""
    path = tmp_path / "in" / BULK_NAME
    path.parent.mkdir()
    path.write_bytes(gzip.compress(ECSV.read_bytes()))
    return path


def _reference_parquet(tmp_path: Path) -> Path:
    """The schema's columns parsed with the csv module and the YAML header, written by pyarrow."""
    text = ECSV.read_text()
    header = "".join(line[2:] + "\n" for line in text.splitlines() if line.startswith("# "))
    meta = yaml.safe_load(header.split("---\n", 1)[1])
    dtypes = {c["name"]: c["datatype"] for c in meta["datatype"]}
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    rows = list(csv.reader(io.StringIO(body)))
    names, data = rows[0], rows[1:]
    cols = {}
    for name in load_schema().required_columns():
        j = names.index(name)
        conv = int if dtypes[name].startswith("int") else float
        vals = [None if r[j] in ("", "nan", "null") else conv(r[j]) for r in data]
        cols[name] = pa.array(vals, TYPES[dtypes[name]])
    path = tmp_path / "reference.parquet"
    pq.write_table(pa.table(cols), path)
    return path


def test_ingest_equals_reading_the_equivalent_parquet(tmp_path, bulk):
    out = ingest(bulk, tmp_path / "out")
    assert [p.name for p in out] == ["GaiaSource_000000-003111.parquet"]
    t = pq.read_table(out[0])
    assert t.num_rows == 5
    assert set(t.column_names) == set(load_schema().required_columns())  # only those
    assert t.schema.field("ra_error").type == pa.float32()
    assert t.schema.field("ra_error").metadata[b"unit"] == b"mas"
    assert t["parallax"].null_count == 2  # 'nan' in the archive file is a null
    got = read_partition(out[0])
    ref = read_partition(_reference_parquet(tmp_path))
    np.testing.assert_array_equal(got.ids, ref.ids)
    np.testing.assert_array_equal(got.X, ref.X)
    np.testing.assert_array_equal(got.X_cov, ref.X_cov)
    assert np.isnan(got.X[:, 2]).sum() == 2 and got.ids[0] == 6636090334814214528


def test_plain_ecsv_and_directories(tmp_path, bulk):
    plain = tmp_path / "in" / "sample.ecsv"
    plain.write_bytes(ECSV.read_bytes())
    out = ingest([bulk.parent], tmp_path / "out")
    assert sorted(p.name for p in out) == ["GaiaSource_000000-003111.parquet", "sample.parquet"]
    a, b = (read_partition(p) for p in sorted(out))
    np.testing.assert_array_equal(a.X_cov, b.X_cov)


def test_truncated_gzip_is_a_clear_error_and_leaves_nothing(tmp_path, bulk):
    data = bulk.read_bytes()
    bulk.write_bytes(data[: len(data) // 2])
    out_dir = tmp_path / "out"
    with pytest.raises(CatalogError, match="truncated or corrupt") as err:
        ingest(bulk, out_dir)
    assert str(bulk) in str(err.value) and err.value.__cause__ is None
    assert list(out_dir.iterdir()) == []  # no partial or temporary file


def test_truncated_data_line(tmp_path):
    text = ECSV.read_text()
    path = tmp_path / "cut.ecsv"
    path.write_text(text[: len(text) - 300])  # last row loses its trailing fields
    with pytest.raises(CatalogError, match="cannot parse ECSV data") as err:
        ingest(path, tmp_path / "out")
    assert str(path) in str(err.value)
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_missing_column_and_not_ecsv(tmp_path):
    lines = ECSV.read_text().splitlines()
    names = next(line for line in lines if not line.startswith("#")).split(",")
    drop = names.index("pmra_error")
    out_lines, skip = [], 0
    for line in lines:  # remove the column from the YAML header and from every row
        if line.startswith("#   name: pmra_error"):
            out_lines.pop()  # its "# -" line
            skip = 1
            continue
        if skip and line.startswith("#   ") and not line.startswith("#   name:"):
            continue
        if skip and line.startswith("# -"):
            skip = 0
        if not line.startswith("#"):
            parts = line.split(",")
            line = ",".join(parts[:drop] + parts[drop + 1 :])
        out_lines.append(line)
    path = tmp_path / "nocol.ecsv"
    path.write_text("\n".join(out_lines) + "\n")
    with pytest.raises(CatalogError, match=r"missing required column\(s\) \['pmra_error'\]"):
        ingest(path, tmp_path / "out")
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(CatalogError, match="not an ECSV file"):
        ingest(bad, tmp_path / "out")


def test_existing_outputs(tmp_path, bulk):
    ingest(bulk, tmp_path / "out")
    with pytest.raises(FileExistsError):
        ingest(bulk, tmp_path / "out")
    assert len(ingest(bulk, tmp_path / "out", skip_existing=True)) == 1
    assert len(ingest(bulk, tmp_path / "out", overwrite=True)) == 1

"""Text tables whose bytes are wrong stop the ingest with a named error (issue 19, point 7).

On main: a CSV starting with a UTF-8 byte-order mark failed with "'ascii' codec can't encode
character '\\ufeff'", a CSV row with too few fields became nulls, and an ECSV float32 column
holding 1e39 was stored as inf. Each must now be a CatalogError naming the file (and the row and
column where there is one), and leave no output behind.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from xd_dask.io import CatalogError, load_schema
from xd_dask.io.ingest import ingest, ingest_table

ECSV_HEADER = """\
# %ECSV 1.0
# ---
# datatype:
# - {name: source_id, datatype: int64}
# - {name: x, datatype: float32}
# - {name: x_error, datatype: float32}
# delimiter: ','
source_id,x,x_error
"""


def test_a_csv_with_a_byte_order_mark_is_named(tmp_path):
    src = tmp_path / "excel.csv"
    src.write_bytes(b"\xef\xbb\xbfsource_id,x,x_error\n1,0.5,0.1\n2,0.7,0.1\n")
    with pytest.raises(CatalogError, match=r"excel.csv: starts with a UTF-8 byte-order mark"):
        ingest_table(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    ecsv = tmp_path / "bom.ecsv"
    ecsv.write_bytes(b"\xef\xbb\xbf" + ECSV_HEADER.encode() + b"1,0.5,0.1\n")
    with pytest.raises(CatalogError, match=r"bom.ecsv: starts with a UTF-8 byte-order mark"):
        ingest_table(ecsv, tmp_path / "out", format="ecsv")


def test_a_ragged_csv_row_is_an_error_naming_the_row(tmp_path):
    src = tmp_path / "ragged.csv"
    rows = [f"{i},{0.5 + i},{0.1}" for i in range(3000)]
    rows[2345] = "2345,7.5"  # one field short: on main it became x_error = null
    src.write_text("source_id,x,x_error\n" + "\n".join(rows) + "\n")
    with pytest.raises(CatalogError, match=r"ragged.csv: row 2345 \(counting") as err:
        ingest_table(src, tmp_path / "out", chunk_bytes=8192)  # the row is in a later chunk
    assert err.value.row == 2345
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # well-formed rows with empty fields are still nulls
    src.write_text("source_id,x,x_error\n1,0.5,\n2,,0.1\n")
    ingest_table(src, tmp_path / "ok")
    got = pq.read_table(tmp_path / "ok")
    assert got["x_error"].to_pylist() == [None, 0.1] and got["x"].to_pylist() == [0.5, None]


@pytest.mark.parametrize("route", ["table", "gaia"])
def test_an_ecsv_float32_overflow_is_an_error_not_inf(tmp_path, route):
    src = tmp_path / "cat.ecsv"
    body = "".join(f"{i},{0.5 * i},0.1\n" for i in range(100))
    body = body.replace("57,28.5,0.1", "57,1e39,0.1")
    src.write_text(ECSV_HEADER + body)
    schema = load_schema(
        {
            "name": "t",
            "id_column": "source_id",
            "feature": [{"name": "x", "error": "x_error"}],
        }
    )
    with pytest.raises(CatalogError, match=r"cat.ecsv: row 57: column 'x' holds 1e\+39") as err:
        if route == "table":
            ingest_table(src, tmp_path / "out")
        else:
            ingest(src, tmp_path / "out", schema)
    assert (err.value.row, err.value.column) == (57, "x")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # the largest float32 is stored as itself, and a written inf stays inf
    src.write_text(ECSV_HEADER + "1,3.4028234e38,0.1\n2,inf,0.1\n")
    ingest(src, tmp_path / "ok", schema)
    x = pq.read_table(tmp_path / "ok")["x"]
    assert str(x.type) == "float"
    np.testing.assert_array_equal(x.to_numpy(), np.array([3.4028234e38, np.inf], np.float32))

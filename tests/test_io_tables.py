"""Any table in: FITS, VOTable, CSV, ECSV and CDS round trips (astropy writes the inputs), the
Parquet layout, atomic failures, and the compiled CDS parser against astropy's reader."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import ascii
from astropy.table import MaskedColumn, Table
from click.testing import CliRunner

from xd_dask.cli import main
from xd_dask.io import CatalogError, load_schema, read_partition
from xd_dask.io.ingest import ingest_table
from xd_dask.io.tables import astropy_to_arrow, open_table

N = 1000
rng = np.random.default_rng(11)
RA = rng.uniform(0, 360, N)
DEC = rng.uniform(-90, 90, N)
PLX = rng.normal(2.0, 1.0, N)
PLX_ERR = rng.uniform(0.02, 0.5, N)
FLAG = rng.integers(0, 100, N).astype(np.int32)
IDS = np.arange(N, dtype=np.int64) * 7919 + 10**15  # not row numbers
NULL_PLX = rng.random(N) < 0.1  # missing parallaxes (and their errors)
NULL_FLAG = rng.random(N) < 0.05
NAMES = np.array([f"s{i}" for i in range(N)])


def _astropy_table() -> Table:
    t = Table()
    t["source_id"] = IDS
    t["ra"] = MaskedColumn(RA, unit="deg", description="Right ascension")
    t["dec"] = MaskedColumn(DEC, unit="deg")
    t["parallax"] = MaskedColumn(PLX, mask=NULL_PLX, unit="mas")
    t["parallax_error"] = MaskedColumn(PLX_ERR, mask=NULL_PLX, unit="mas")
    t["flag"] = MaskedColumn(FLAG, mask=NULL_FLAG)
    t["name"] = NAMES
    t["vec"] = np.ones((N, 3))  # multidimensional: left out
    return t


def _check(parts: list[Path], *, units: bool, n_parts: int, id_col: str = "source_id"):
    assert len(parts) == n_parts and all(p.is_file() for p in parts)
    t = pq.read_table(parts[0].parent)  # the directory: every part, in order
    assert t.num_rows == N and "vec" not in t.column_names
    np.testing.assert_array_equal(t[id_col].to_numpy(), IDS)
    np.testing.assert_array_equal(t["ra"].to_numpy(), RA)  # exact: binary or repr round trip
    np.testing.assert_array_equal(t["dec"].to_numpy(), DEC)
    plx = t["parallax"]
    assert plx.null_count == NULL_PLX.sum()
    np.testing.assert_array_equal(np.asarray(plx.is_null()), NULL_PLX)
    np.testing.assert_array_equal(plx.to_numpy(zero_copy_only=False)[~NULL_PLX], PLX[~NULL_PLX])
    assert t["parallax_error"].null_count == NULL_PLX.sum()
    np.testing.assert_array_equal(np.asarray(t["flag"].is_null()), NULL_FLAG)
    flag = t["flag"].to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(flag[~NULL_FLAG], FLAG[~NULL_FLAG])
    assert t["name"].to_pylist() == NAMES.tolist()
    meta = {f.name: f.metadata or {} for f in t.schema}
    if units:
        assert meta["ra"][b"unit"] == b"deg" and meta["parallax_error"][b"unit"] == b"mas"
    for p in parts:  # full row groups of 150 rows, the last of each file smaller
        md = pq.ParquetFile(p).metadata
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        assert len(sizes) >= 2 and set(sizes[:-1]) == {150} and 0 < sizes[-1] <= 150, sizes
    return t


def test_fits_round_trip_streamed_through_memmap(tmp_path):
    src = tmp_path / "cat.fits"
    _astropy_table().write(src)
    parts = ingest_table(
        src, tmp_path / "out", chunk_rows=300, rows_per_file=400, row_group_size=150
    )
    _check(parts, units=True, n_parts=3)
    assert open_table(src).streamed


def test_votable_round_trip(tmp_path):
    src = tmp_path / "cat.vot"
    _astropy_table().write(src, format="votable")
    parts = ingest_table(src, tmp_path / "out", rows_per_file=600, row_group_size=150)
    _check(parts, units=True, n_parts=2)
    assert not open_table(src).streamed  # XML: read whole


def test_csv_round_trip_in_chunks(tmp_path):
    src = tmp_path / "cat.csv"
    t = _astropy_table()
    del t["vec"]
    t.write(src, format="ascii.csv")  # plain CSV: no units; masked values as empty fields
    assert src.stat().st_size > 3 * 16384
    parts = ingest_table(
        src, tmp_path / "out", rows_per_file=N, row_group_size=150, chunk_bytes=16384
    )
    out = _check(parts, units=False, n_parts=1)
    assert all(not (f.metadata or {}).get(b"unit") for f in out.schema)


def test_ecsv_round_trip_keeps_units(tmp_path):
    src = tmp_path / "cat.ecsv"
    t = _astropy_table()
    del t["vec"]
    t.write(src, format="ascii.ecsv", delimiter=",")
    parts = ingest_table(src, tmp_path / "out", rows_per_file=N, row_group_size=150)
    _check(parts, units=True, n_parts=1)


def test_csv_type_change_between_chunks_starts_a_new_part(tmp_path):
    # astropy guesses types per chunk: "x" is all integers in the first chunks, then floats
    src = tmp_path / "mixed.csv"
    x = [str(i) for i in range(3000)] + [f"{i}.5" for i in range(3000)]
    src.write_text("id,x\n" + "".join(f"{i},{v}\n" for i, v in enumerate(x)))
    parts = ingest_table(src, tmp_path / "out", chunk_bytes=8192)
    assert len(parts) >= 2
    t = pa.concat_tables(
        [pq.read_table(p).cast(pa.schema([("id", pa.int64()), ("x", pa.float64())])) for p in parts]
    )
    np.testing.assert_array_equal(t["x"].to_numpy(), np.array(x, float))
    np.testing.assert_array_equal(t["id"].to_numpy(), np.arange(6000))


def test_no_id_column_adds_row_index_and_reads_back(tmp_path):
    src = tmp_path / "noid.fits"
    t = _astropy_table()
    del t["source_id"], t["flag"]
    t.write(src)
    parts = ingest_table(src, tmp_path / "out", rows_per_file=300)
    out = pq.read_table(tmp_path / "out")
    np.testing.assert_array_equal(out["row_index"].to_numpy(), np.arange(N))
    schema = load_schema(
        {
            "name": "t",
            "id_column": "row_index",
            "nan_is_null": False,
            "feature": [
                {"name": "ra", "unit": "deg", "variance": 1e-6},
                {"name": "parallax", "unit": "mas", "error": "parallax_error"},
            ],
        }
    )
    blk = [read_partition(p, schema) for p in parts]
    assert sum(b.n_rows for b in blk) == N
    X = np.concatenate([b.X for b in blk])
    np.testing.assert_array_equal(X[~NULL_PLX, 1], PLX[~NULL_PLX])
    assert np.isnan(X[NULL_PLX, 1]).all()


def test_outputs_are_atomic_and_overwrite_removes_stale_parts(tmp_path):
    src = tmp_path / "cat.fits"
    _astropy_table().write(src)
    out = tmp_path / "out"
    assert len(ingest_table(src, out, rows_per_file=250)) == 4
    with pytest.raises(FileExistsError, match="overwrite"):
        ingest_table(src, out)
    assert [p.name for p in ingest_table(src, out, overwrite=True)] == ["cat-00000.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["cat-00000.parquet"]
    # a table that fails half-way leaves nothing behind
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n" + "1,2\n" * 5000 + "1,2,3,4\n")
    with pytest.raises(CatalogError, match="bad.csv"):
        ingest_table(bad, out, chunk_bytes=4096, rows_per_file=1000)
    assert sorted(p.name for p in out.iterdir()) == ["cat-00000.parquet"]
    # truncated FITS: an error naming the file
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(CatalogError, match="cat.fits"):
        ingest_table(src, tmp_path / "out2")
    assert not (tmp_path / "out2").exists() or not list((tmp_path / "out2").iterdir())


# ----------------------------------------------------------------------------------- CDS
README = """\
J/X/1    A test table    (Nobody, 2024)
================================================================================
Byte-by-byte Description of file: t1.dat
--------------------------------------------------------------------------------
   Bytes Format Units   Label     Explanations
--------------------------------------------------------------------------------
   1-  5  I5    ---     Seq       Sequence number
   7- 14  F8.3  deg     RAdeg     Right ascension
  16- 23  F8.3  deg     DEdeg     ?=-99.999 Declination
  25- 31  F7.2  mag     Vmag      ? V magnitude
  33- 41  E9.2  Jy      Flux      ? Flux
  43- 47  A5    ---     Name      Name
  49- 52  I4    ---     Flag      ?=- Flag
--------------------------------------------------------------------------------
"""


def _cds_line(seq, ra, dec, vmag, flux, name, flag) -> str:
    v = f"{vmag:7.2f}" if vmag is not None else " " * 7
    f = f"{flux:9.2E}" if flux is not None else " " * 9
    return f"{seq:5d} {ra:8.3f} {dec:8.3f} {v} {f} {name:<5s} {flag:>4s}".rstrip() + "\n"


def _cds_rows(n: int, seed: int) -> list[tuple]:
    r = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        dec = -99.999 if r.random() < 0.1 else round(float(r.uniform(-90, 90)), 3)
        vmag = None if r.random() < 0.1 else round(float(r.uniform(-1, 20)), 2)
        flux = None if r.random() < 0.1 else float(r.choice([1.5e-3, 2.25e10, -3.0e-20, 7.0]))
        name = "" if r.random() < 0.2 else f"n{i % 997}"
        flag = "-" if r.random() < 0.1 else str(int(r.integers(-999, 9999)))
        rows.append((i, round(float(r.uniform(0, 360)), 3), dec, vmag, flux, name, flag))
    return rows


@pytest.mark.parametrize("odd", [False, True], ids=["compiled", "astropy-fallback"])
def test_cds_with_readme_equals_astropy_and_the_values_written(tmp_path, odd):
    rows = _cds_rows(2500, 3)
    text = "".join(_cds_line(*r) for r in rows)
    if odd:  # a power of ten the compiled pass declines: that chunk goes to astropy
        rows[1700] = rows[1700][:4] + (1e30,) + rows[1700][5:]
        text = "".join(_cds_line(*r) for r in rows)
        assert " 1.00E+30 " in text
    src = tmp_path / "t1.dat"
    src.write_text(text)
    (tmp_path / "ReadMe").write_text(README)
    parts = ingest_table(
        src, tmp_path / "out", chunk_rows=1000, rows_per_file=1200, id_column="Seq"
    )
    got = pq.read_table(tmp_path / "out")
    ref = astropy_to_arrow(ascii.read(src, format="cds", readme=tmp_path / "ReadMe", guess=False))
    assert len(parts) == 3 and got.equals(ref) and got.schema.equals(ref.schema, True)
    # against the values written
    exp_dec = [None if r[2] == -99.999 else r[2] for r in rows]
    assert got["DEdeg"].to_pylist() == exp_dec and got["Vmag"].to_pylist() == [r[3] for r in rows]
    assert got["Seq"].to_pylist() == list(range(2500))
    assert got["Flux"].to_pylist() == [r[4] for r in rows]
    assert got["Name"].to_pylist() == [r[5] or None for r in rows]
    assert got["Flag"].to_pylist() == [None if r[6] == "-" else int(r[6]) for r in rows]
    meta = got.schema.field("RAdeg").metadata
    assert meta[b"unit"] == b"deg" and meta[b"description"] == b"Right ascension"


def test_cds_gzip_and_single_file_mrt(tmp_path):
    rows = _cds_rows(50, 4)
    data = "".join(_cds_line(*r) for r in rows)
    (tmp_path / "ReadMe").write_text(README)
    (tmp_path / "t1.dat.gz").write_bytes(gzip.compress(data.encode()))
    ingest_table(tmp_path / "t1.dat.gz", tmp_path / "a", id_column="Seq")  # ReadMe found beside
    single = tmp_path / "single" / "t1.dat"
    single.parent.mkdir()
    single.write_text(README + data)  # header and data in one file (read whole by astropy)
    assert not open_table(single).streamed
    ingest_table(single, tmp_path / "b", id_column="Seq")
    a, b = pq.read_table(tmp_path / "a"), pq.read_table(tmp_path / "b")
    assert a.equals(b) and a.num_rows == 50
    # a directory as input: its tables (not the ReadMe) through the CLI
    res = CliRunner().invoke(
        main, ["ingest", str(tmp_path), "-o", str(tmp_path / "c"), "--id-column", "Seq"]
    )
    assert res.exit_code == 0, res.output
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["t1-00000.parquet"]
    assert pq.read_table(tmp_path / "c").equals(a)
    np.testing.assert_array_equal(a["Seq"].to_numpy(), np.arange(50))


def test_ingest_command_for_any_table(tmp_path):
    src = tmp_path / "cat.fits"
    _astropy_table().write(src)
    res = CliRunner().invoke(
        main, ["ingest", str(src), "-o", str(tmp_path / "pq"), "--rows-per-file", "600"]
    )
    assert res.exit_code == 0, res.output
    assert "Wrote 2 Parquet file(s), 1,000 rows" in res.output
    res = CliRunner().invoke(main, ["ingest", str(src), "-o", str(tmp_path / "pq")])
    assert res.exit_code == 2 and "exists" in res.output
    # with a schema: only its columns (and its id)
    schema = tmp_path / "s.toml"
    schema.write_text(
        'name = "s"\nid_column = "source_id"\n[[feature]]\nname = "parallax"\n'
        'unit = "mas"\nerror = "parallax_error"\n'
    )
    res = CliRunner().invoke(
        main, ["ingest", str(src), "-o", str(tmp_path / "pq2"), "--schema", str(schema)]
    )
    assert res.exit_code == 0, res.output
    assert pq.read_table(tmp_path / "pq2").column_names == [
        "source_id",
        "parallax",
        "parallax_error",
    ]
    res = CliRunner().invoke(main, ["ingest", str(tmp_path / "s.toml"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and "cannot tell the table format" in res.output

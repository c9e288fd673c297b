"""A unit in the file that disagrees with the schema stops the read (issue 19, point 7).

A real FITS file with x in rad and x_err in mas, ingested (the units travel as Parquet field
metadata) and read with a schema that says mag: on main the read succeeded and S was off by
(mas/rad)^2 = (2.06e8)^-2 with no warning; now the read stops naming the file, the column and both
units. With the schema right (rad, error_unit mas) S holds the errors converted to rad.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.table import Table

from xd_dask.io import CatalogError, load_schema, read_partition
from xd_dask.io.ingest import ingest_table
from xd_dask.io.reader import _parse_unit, _spelling, units_agree
from xd_dask.model import XDModel
from xd_dask.params import Params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAS_IN_RAD = float((1 * u.mas).to(u.rad).value)  # 4.85e-9


def _schema(unit: str, error_unit: str | None = None) -> dict:
    feature = {"name": "x", "unit": unit, "error": "x_err"}
    if error_unit is not None:
        feature["error_unit"] = error_unit  # mas -> rad: the scale is derived
    return {"name": "radians", "id_column": "source_id", "feature": [feature]}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("units")
    rng = np.random.default_rng(2)
    t = Table()
    t["source_id"] = np.arange(200, dtype=np.int64)
    t["x"] = rng.uniform(0, 2 * np.pi, 200) * u.rad
    t["x_err"] = rng.uniform(0.1, 2.0, 200) * u.mas
    t.write(root / "stars.fits")
    ingest_table(root / "stars.fits", root / "cat")
    return root / "cat" / "stars-00000.parquet", t


def test_a_file_unit_that_disagrees_with_the_schema_stops_the_read(catalogue):
    part, _ = catalogue
    with pytest.raises(CatalogError) as err:
        read_partition(part, load_schema(_schema("mag")))
    text = str(err.value)
    assert "stars-00000.parquet: column 'x' is in 'rad'" in text and "says 'mag'" in text
    assert err.value.column == "x" and err.value.reason == "unit_mismatch"
    # the value's unit right, the error's not declared: x_err (mas) is taken as rad
    with pytest.raises(CatalogError, match=r"column 'x_err' is in 'mas'.*says 'rad'"):
        read_partition(part, load_schema(_schema("rad")))


def test_the_right_units_give_the_right_covariances(catalogue):
    part, table = catalogue
    block = read_partition(part, load_schema(_schema("rad", "mas")))
    np.testing.assert_allclose(block.X[:, 0], table["x"].value, rtol=1e-15)
    expected = (np.asarray(table["x_err"].value) * MAS_IN_RAD) ** 2
    np.testing.assert_allclose(block.X_cov[:, 0, 0], expected, rtol=1e-12)


def test_units_agree_by_value_not_by_spelling():
    assert units_agree("mas.yr**-1", "mas/yr") and units_agree("deg", "degree")
    assert units_agree("km.s**-1", "km/s") and units_agree("---", "")
    assert not units_agree("rad", "mag") and not units_agree("mas", "arcsec")
    assert not units_agree("%", "") and not units_agree("deg", "rad")


def test_spellings_taken_as_equal_without_astropy_are_equal_units():
    """The text shortcut of units_agree (no astropy import) only says yes where astropy does."""
    units = ["deg", "mas", "mas.yr**-1", "mas/yr", "km.s**-1", "km/s", "mag", "yr", "d", "pc",
             "um**-1", "electron.s**-1", "mas.yr**-2", "mas.yr**-1 "]  # fmt: skip
    for a in units:
        for b in units:
            if _spelling(a) == _spelling(b):
                assert _parse_unit(a).to(_parse_unit(b)) == 1.0, (a, b)
    assert _spelling("mas.yr**-1") == _spelling(" mas/yr") and _spelling("mas.yr**-2") != "mas/yr"


def test_reading_the_archives_units_does_not_import_astropy(tmp_path):
    """Real DR3 rows from the archive's ECSV (units spelt mas.yr**-1, the schema's mas/yr),
    ingested to Parquet, read in a fresh process: the units are checked and astropy (0.3-0.5 s
    of import on each worker's first partition) is never loaded."""
    ingest_table(REPO / "tests/data/gaia_dr3_archive_5rows.ecsv", tmp_path / "cat")
    code = (
        "import sys, glob; from xd_dask.io import load_schema, read_partition; "
        f"f = glob.glob({str(tmp_path / 'cat')!r} + '/*.parquet')[0]; "
        "b = read_partition(f, load_schema('gaia_dr3')); "
        "print(len(b.ids), b.n_read, 'astropy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["5", "5", "False"], out.stdout + out.stderr


@pytest.mark.cluster
def test_score_stops_with_the_unit_mismatch(catalogue, cluster, tmp_path):
    """The command line: exit 2 (the units are read from the Parquet footers before the cluster
    is used, like every check of the schema against the catalogue), one Error line naming it."""
    part, _ = catalogue
    schema = tmp_path / "mag.toml"
    schema.write_text(
        'name = "mag"\nid_column = "source_id"\n\n[[feature]]\nname = "x"\nunit = "mag"\n'
        'error = "x_err"\n'
    )
    model = tmp_path / "model.npz"
    XDModel(Params(np.array([1.0]), np.array([[3.0]]), np.array([[[1.0]]])), ["x"]).save(model)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [str(BIN / "xd-dask"), "score", str(model), str(part.parent), "--schema", str(schema)]
        + ["--scheduler-address", cluster.scheduler_address],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "column 'x' is in 'rad' (the file's unit) but schema 'mag' says 'mag'" in proc.stderr

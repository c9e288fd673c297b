"""xd-dask make-catalog / ingest: outputs, exit codes (2 usage/config, 1 failure), errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from xd_dask.cli import main
from xd_dask.io import read_partition

ECSV = Path(__file__).parent / "data" / "gaia_dr3_archive_5rows.ecsv"


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(res, *needles):
    err = res.stderr if hasattr(res, "stderr") else res.output
    lines = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_make_catalog_command(tmp_path):
    out = tmp_path / "cat"
    res = _run(["make-catalog", out, "--rows", 3000, "--partitions", 2, "--seed", 9])
    assert res.exit_code == 0, res.output
    assert "Wrote 3000 rows in 2 files" in res.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["seed"] == 9 and man["n_rows"] == 3000
    assert sum(read_partition(out / f["name"]).n_rows for f in man["files"]) == 3000
    # existing output: a usage problem, exit 2, one line naming the directory
    res = _run(["make-catalog", out, "--rows", 3000])
    assert res.exit_code == 2
    _one_line_error(res, str(out), "--overwrite")
    assert _run(["make-catalog", out, "--rows", 10, "--overwrite"]).exit_code == 0
    res = _run(["make-catalog", out, "--rows", 0])
    assert res.exit_code == 2 and "--rows" in res.output
    res = _run(["make-catalog", tmp_path / "x", "--rows", 5, "--frac-two-param", 2])
    assert res.exit_code == 2


def test_ingest_command(tmp_path):
    src = tmp_path / "GaiaSource_000000-003111.csv.gz"
    src.write_bytes(gzip.compress(ECSV.read_bytes()))
    res = _run(["ingest", src, "--out", tmp_path / "pq"])
    assert res.exit_code == 0, res.output
    blk = read_partition(tmp_path / "pq" / "GaiaSource_000000-003111.parquet")
    assert blk.n_rows == 5 and np.isnan(blk.X[:, 2]).sum() == 2
    # output exists: usage (2); schema unknown: config (2); truncated input: failure (1)
    res = _run(["ingest", src, "--out", tmp_path / "pq"])
    assert res.exit_code == 2
    _one_line_error(res, "exists")
    res = _run(["ingest", src, "--out", tmp_path / "pq2", "--schema", "no_such_schema"])
    assert res.exit_code == 2
    _one_line_error(res, "no_such_schema")
    src.write_bytes(src.read_bytes()[:1500])
    res = _run(["ingest", src, "--out", tmp_path / "pq3"])
    assert res.exit_code == 1
    _one_line_error(res, str(src))
    res = _run(["ingest", tmp_path / "missing.csv.gz", "--out", tmp_path / "pq4"])
    assert res.exit_code == 2  # click: path does not exist

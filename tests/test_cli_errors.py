"""One error handler for every command (issue 11, problem 6): documented exit codes, one
`Error:` line, multi-line library messages indented below it, worker tracebacks only with -v;
and `fit --overwrite` deletes checkpoints only under the output lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.shared_data import GAIA_DIR
from xd_dask.cli.app import EXIT_FAILURE, EXIT_USAGE, command
from xd_dask.distributed.manifest import CatalogueChangedError, ManifestError
from xd_dask.io import CatalogError, SchemaError
from xd_dask.jobs.config import ConfigError, load_config
from xd_dask.locks import LockError, output_lock
from xd_dask.model import ModelFileError
from xd_dask.optim.robust import FitDivergedError, diverged_error

GAIA_CONE = GAIA_DIR / "dr3_cone_ra45_dec0_r0.5.parquet"
BIN = Path(sys.executable).parent


def _raiser(exc: BaseException) -> click.Group:
    group = click.Group()

    @command("go", group=group)
    def go() -> None:
        raise exc

    return group


def _diverged() -> FitDivergedError:
    rows = [
        {"file": "cat/a.parquet", "row": 7, "id_column": "source_id", "id": 99,
         "ll_before": -3.0, "ll_after": -4e9, "component": 2},
        {"file": "cat/b.parquet", "row": 1, "id_column": "source_id", "id": 5,
         "ll_before": -2.5, "ll_after": -80.0, "component": 0},
    ]  # fmt: skip
    last = {"iteration": 4, "reseeded": [2]}
    return diverged_error("batch-em", last, -10.0, -90.0, 0.1, rows, rolled_back=True)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConfigError("fit.k must be >= 1"), EXIT_USAGE),
        (SchemaError("no such schema"), EXIT_USAGE),
        (ModelFileError("not a model"), EXIT_USAGE),
        (LockError("in use by pid 1"), EXIT_USAGE),
        (ManifestError("cat/a.parquet and cat/b.parquet share id 5"), EXIT_USAGE),
        (CatalogueChangedError("cat/a.parquet changed"), EXIT_USAGE),
        (CatalogError("cat/a.parquet: row 3: negative error"), EXIT_FAILURE),
        (FitDivergedError("update failed"), EXIT_FAILURE),
        (OSError(28, "No space left on device"), EXIT_FAILURE),
        (RuntimeError("cluster lost"), EXIT_FAILURE),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_exit_codes(exc, code):
    res = CliRunner().invoke(_raiser(exc), ["go"])
    assert res.exit_code == code, res.output
    lines = res.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(exc) in lines[0]
    assert "Traceback" not in res.output


def test_multi_line_library_errors_stay_readable():
    exc = _diverged()
    res = CliRunner().invoke(_raiser(exc), ["go"])
    assert res.exit_code == EXIT_FAILURE
    lines = res.output.splitlines()
    assert [ln for ln in lines if ln.startswith("Error: ")] == [lines[0]]
    assert lines[0].startswith("Error: FitDivergedError: batch-em: the mean log-likelihood")
    assert len(lines) == len(str(exc).splitlines())  # nothing joined or lost
    assert all(ln.startswith("  ") for ln in lines[1:])
    row = "    cat/a.parquet row 7 (source_id 99): log-likelihood -3 -> -4e+09 (component 2 before)"
    assert row in lines
    res = CliRunner().invoke(_raiser(exc), ["go", "-v"])
    assert "Traceback" in res.output  # -v: the Python traceback too


def _bad_catalogue(tmp_path: Path) -> Path:
    """The real cone with a negative parallax error in row 1000 (a 5-parameter row)."""
    t = pq.read_table(GAIA_CONE)
    i = t.column_names.index("parallax_error")
    err = t["parallax_error"]
    assert err[1000].as_py() > 0
    new = pc.if_else(pa.array([j == 1000 for j in range(t.num_rows)]), -1.0, err)
    out = tmp_path / "cat" / "cone.parquet"
    out.parent.mkdir()
    pq.write_table(t.set_column(i, "parallax_error", new), out)
    return out.parent


@pytest.mark.cluster
def test_worker_tracebacks_reach_the_terminal_only_with_v(tmp_path):
    """A local cluster started by `xd-dask fit`: its workers' "Compute Failed" blocks and the
    traceback go to the terminal (the real stderr) only with -v."""
    cat = _bad_catalogue(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XD_DASK_") or "CACHE" in k}
    args = [str(BIN / "xd-dask"), "fit", "--catalog", str(cat), "-k", "2", "--n-workers", "1",
            "--set", "cluster.dashboard_address=", "--set", "output.plots=false"]  # fmt: skip
    quiet = subprocess.run(
        [*args, "--out", str(tmp_path / "a")], env=env, capture_output=True, text=True, timeout=240
    )
    assert quiet.returncode == EXIT_FAILURE, quiet.stderr
    err = quiet.stderr.splitlines()
    assert [ln for ln in err if ln.startswith("Error: ")] == err, quiet.stderr
    assert "cone.parquet: row 1000" in err[0] and "--on-bad drop" in err[0]
    loud = subprocess.run(
        [*args, "--out", str(tmp_path / "b"), "-v"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert loud.returncode == EXIT_FAILURE
    assert "Traceback" in loud.stderr and "Compute Failed" in loud.stderr
    assert sum(ln.startswith("Error: ") for ln in loud.stderr.splitlines()) == 1


def test_overwrite_deletes_checkpoints_only_under_the_output_lock(tmp_path):
    """A running fit holds the output lock: `fit --overwrite` into its directory must fail
    without touching its checkpoints (they were deleted before the lock was taken)."""
    from xd_dask.jobs.runner import CHECKPOINT_DIR, run_fit

    out = tmp_path / "out"
    ckpt = out / CHECKPOINT_DIR
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.npz").write_bytes(b"the running fit's state")
    cfg = load_config(overrides={"catalog.path": str(GAIA_CONE)}, environ={})
    with output_lock(out):  # the running fit
        with pytest.raises(LockError):
            run_fit(cfg, client=None, out_dir=out, overwrite=True)
    assert (ckpt / "checkpoint.npz").read_bytes() == b"the running fit's state"
    with pytest.raises(ConfigError, match="already holds the checkpoints"):
        run_fit(cfg, client=None, out_dir=out)  # no lock holder, no --overwrite
    assert ckpt.is_dir()

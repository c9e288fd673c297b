"""`--log-format json` (issue 21.3): every output line is JSON, errors included (an `error`
event on stdout, the exit code unchanged), warnings included (Python's, the CLI's and Dask's
log records, routed through logging); usage errors met while parsing the arguments too."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import tomli_w
from click.testing import CliRunner

from tests.shared_data import GAIA_DIR
from xd_dask.cli import main
from xd_dask.cli.app import EXIT_FAILURE, EXIT_USAGE, command, warn
from xd_dask.io import CatalogError

BIN = Path(sys.executable).parent
GAIA_CONE = GAIA_DIR / "dr3_cone_ra45_dec0_r0.5.parquet"


def _json_lines(text: str) -> list[dict]:
    """Every non-empty line parsed as JSON (a line that is not JSON fails the test)."""
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"not a JSON line: {line!r}\nin:\n{text}")
    return out


def _noisy_group() -> click.Group:
    """A command that does what a real one may: an event, a CLI warning, a Python warning, a
    record of Dask's own logger, then a bad-row error."""
    group = click.Group()

    @command("go", group=group, json_output=True)
    def go() -> None:
        click.echo(json.dumps({"event": "start"}))
        warn("--catalog replaces the catalogue")
        warnings.warn("the fit did not converge", UserWarning, stacklevel=1)
        warnings.warn("the fit did not converge", UserWarning, stacklevel=1)  # shown once
        logging.getLogger("distributed.worker").warning("Unmanaged memory use is high")
        raise CatalogError("cat/a.parquet: row 3 (source_id=7): column 'e_x': negative error")

    return group


def test_json_mode_errors_and_warnings_are_json_lines():
    res = CliRunner().invoke(_noisy_group(), ["go", "--log-format", "json"])
    assert res.exit_code == EXIT_FAILURE  # the same code as in text mode
    out, err = _json_lines(res.stdout), _json_lines(res.stderr)
    assert [e["event"] for e in out] == ["start", "error"]
    error = out[-1]
    assert error["exit_code"] == EXIT_FAILURE and error["type"] == "CatalogError"
    assert error["message"].startswith("cat/a.parquet: row 3")
    logs = {(e["logger"], e["level"], e["message"]) for e in err}
    assert ("xd_dask.warnings", "warning", "--catalog replaces the catalogue") in logs
    assert ("distributed.worker", "warning", "Unmanaged memory use is high") in logs
    py = [e for e in err if e.get("category") == "UserWarning"]
    assert len(py) == 1 and py[0]["message"] == "UserWarning: the fit did not converge"
    # text mode: the same command, plain lines
    res = CliRunner().invoke(_noisy_group(), ["go"])
    assert res.exit_code == EXIT_FAILURE
    assert res.stderr.splitlines()[-1].startswith("Error: cat/a.parquet: row 3")
    assert "Warning: UserWarning: the fit did not converge" in res.stderr
    # the process's logging is left as it was
    assert not any(getattr(h, "_xd_dask_cli", False) for h in logging.getLogger().handlers)


def test_json_mode_usage_errors_while_parsing_are_json():
    res = CliRunner().invoke(
        main, ["select", "-k", "0,8", "--catalog", "x", "--log-format", "json"]
    )
    assert res.exit_code == EXIT_USAGE
    assert res.stderr == ""
    (event,) = _json_lines(res.stdout)
    assert event["event"] == "error" and event["exit_code"] == EXIT_USAGE
    assert "-k" in event["message"]
    res = CliRunner().invoke(main, ["select", "-k", "0,8", "--catalog", "x"])  # text: click's
    assert res.exit_code == EXIT_USAGE and "Error: Invalid value for '-k'" in res.output


def _bad_catalogue(tmp_path: Path) -> Path:
    """The real cone with a negative parallax error in row 1000."""
    t = pq.read_table(GAIA_CONE)
    i = t.column_names.index("parallax_error")
    new = pc.if_else(pa.array([j == 1000 for j in range(t.num_rows)]), -1.0, t["parallax_error"])
    out = tmp_path / "cat" / "cone.parquet"
    out.parent.mkdir()
    pq.write_table(t.set_column(i, "parallax_error", new), out)
    return out.parent


@pytest.mark.cluster
def test_a_failing_fit_on_a_local_cluster_writes_only_json(tmp_path):
    """A real `xd-dask fit` subprocess: a local cluster starts and stops, a warning is given
    (the job file's held-out set is dropped by --catalog), a worker meets a bad row. Every line
    on stdout and stderr is JSON; the error is an event on stdout with exit code 1."""
    cat = _bad_catalogue(tmp_path)
    job = tmp_path / "job.toml"
    job.write_text(tomli_w.dumps({"catalog": {"path": str(GAIA_CONE), "holdout": str(GAIA_CONE)}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("XD_DASK_") or "CACHE" in k}
    args = [str(BIN / "xd-dask"), "fit", str(job), "--catalog", str(cat), "-k", "2",
            "--n-workers", "1", "--set", "output.plots=false", "--out", str(tmp_path / "out"),
            "--log-format", "json", "-v"]  # fmt: skip
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == EXIT_FAILURE, run.stderr
    out, err = _json_lines(run.stdout), _json_lines(run.stderr)
    assert out[0]["event"] == "start" and out[-1]["event"] == "error"
    assert out[-1]["exit_code"] == EXIT_FAILURE
    assert "cone.parquet: row 1000" in out[-1]["message"]
    assert "--on-bad drop" in out[-1]["message"]
    assert "Traceback" in out[-1]["traceback"]  # -v: the traceback, inside the event
    warned = [e for e in err if e["logger"] == "xd_dask.warnings"]
    assert any("--catalog replaces the catalogue" in e["message"] for e in warned)
    assert any(e["logger"].startswith("xd_dask.") and e["level"] == "info" for e in err)  # -v
    assert not (tmp_path / "out").exists()  # a failed fit leaves nothing behind

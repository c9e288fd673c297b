"""README's "From Python" examples run as written (issue 21.5): a partitioned catalogue fitted on
an existing Client with fit_catalog(FitConfig(...), client), and DaskXDGMM on dask arrays; only
the scheduler address, the catalogue's path and the in-memory rows are the test's."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.distributed_data import make_rows
from tests.shared_data import GAIA_DIR

pytestmark = pytest.mark.cluster

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    """The Python blocks of README's "From Python" section."""
    text = README.read_text()
    section = text.split("### From Python")[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_fit_catalog_on_an_existing_client(cluster, tmp_path, monkeypatch):
    code = _blocks()[0]
    assert "fit_catalog(cfg, client" in code and "FitConfig(" in code
    shutil.copy(GAIA_DIR / "dr3_allsky_1000.parquet", tmp_path / "part-0.parquet")
    code = code.replace('"tcp://scheduler:8786"', repr(cluster.scheduler_address))
    code = code.replace('"gaia/"', repr(str(tmp_path)))
    monkeypatch.chdir(tmp_path)
    space: dict = {}
    exec(compile(code, "README.md", "exec"), space)  # noqa: S102 - the documented example
    model, held = space["model"], space["held"]
    space["client"].close()
    assert model.n_components == 8 and (tmp_path / "model.npz").is_file()
    assert 0 < held.n_rows < 200 and np.isfinite(held.mean_loglike)
    assert model.metadata["rows_used"] + held.n_rows == 1000


def test_dask_xdgmm_example(client):
    code = _blocks()[1]
    assert "DaskXDGMM(" in code
    X_np, S_np = make_rows(8, 3000)
    space = {"X_np": X_np, "S_np": S_np}
    exec(compile(code.replace("100_000", "1_000"), "README.md", "exec"), space)  # noqa: S102
    xd = space["xd"]
    assert xd.means_.shape == (4, 3) and xd.history_[-1].get("final")
    assert space["ll"].compute().shape == (3000,)

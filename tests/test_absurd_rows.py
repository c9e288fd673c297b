"""A few absurd rows never give a "converged" wrong model (issue 19.4): the fit stops naming
the rows, or with a background component the background takes them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from tests.distributed_data import make_rows, rows_as_written, write_catalog
from tests.mixtures import known_mixture_3d
from xd_dask.cli import main
from xd_dask.estimator import XDGMM
from xd_dask.optim import FitDivergedError

K = 3


@pytest.fixture(scope="module")
def clean():
    X, S = rows_as_written(*make_rows(seed=17, n=4000))
    return X, S


def _with(X, S, rows: np.ndarray):
    """The rows plus ``rows`` (given the noise of the first rows)."""
    return np.vstack([X, rows]), np.vstack([S, S[: len(rows)]])


def _means_ok(means) -> None:
    _, m, _ = known_mixture_3d()
    err = [np.min(np.linalg.norm(means - c, axis=1)) for c in m]
    assert max(err) < 0.15, (means, err)


@pytest.mark.parametrize("method", ["em", "adam"])
def test_ten_rows_far_away_are_named_not_fitted(clean, method):
    """Ten rows at (1e6, -1e6, 0) take a component of their own and a real one is lost: the fit
    stops naming them (rows 4000..4009), for batch EM and Adam alike."""
    X, S = _with(*clean, np.tile([1e6, -1e6, 0.0], (10, 1)))
    with pytest.raises(FitDivergedError) as info:
        XDGMM(K, method=method, random_state=0).fit(X, S)
    rows = {r["row"] for r in info.value.rows}
    assert rows and rows <= set(range(4000, 4010)), str(info.value)


def test_one_row_at_1e30_is_named_not_fitted(clean):
    X, S = _with(*clean, np.array([[1e30, 0.0, 0.0]]))
    with pytest.raises(FitDivergedError) as info:
        XDGMM(K, random_state=0).fit(X, S)
    assert 4000 in {r["row"] for r in info.value.rows}, str(info.value)


@pytest.mark.parametrize("absurd", [[[1e30, 0.0, 0.0]], [[1e6, -1e6, 0.0]] * 10])
def test_with_a_background_the_absurd_rows_are_isolated(clean, absurd):
    X, S = _with(*clean, np.array(absurd, dtype=float))
    xd = XDGMM(K, background=True, random_state=0).fit(X, S)
    _means_ok(xd.means_)
    n = len(absurd)
    assert 0.5 * n / len(X) < xd.background_.weight < (n + 30) / len(X)
    r = xd.predict_proba(X[-n:], S[-n:])
    assert r.sum(axis=1).max() < 1e-6  # each absurd row is the background's


@pytest.mark.cluster
def test_the_cli_exits_nonzero_naming_the_rows_by_the_schemas_id_column(clean, tmp_path):
    """On a cluster through `xd-dask fit`: not exit 0; the message names the file and the rows
    under the schema's id column name."""
    X, S = _with(*clean, np.tile([1e6, -1e6, 0.0], (10, 1)))
    write_catalog(tmp_path / "cat", X, S, 2, first_id=0)
    schema = tmp_path / "plain.toml"
    schema.write_text(
        'name = "plain3"\nid_column = "source_id"\n'
        + "".join(f'[[feature]]\nname = "x{i}"\nerror = "x{i}_error"\n' for i in range(3))
    )
    res = CliRunner().invoke(
        main,
        ["fit", "--catalog", str(tmp_path / "cat"), "--schema", str(schema), "-k", str(K),
         "--out", str(tmp_path / "out"), "--set", "cluster.n_workers=2",
         "--set", "output.plots=false", "--log-format", "json"],
    )  # fmt: skip
    assert res.exit_code != 0, res.output
    text = res.output
    named = {int(i) for i in re.findall(r"source_id (\d+)", text)}
    assert named and named <= set(range(4000, 4010)), text
    assert "part-0001.parquet" in text
    assert not (tmp_path / "out" / "model.npz").exists()
    # the fit failed after converging: its checkpoints are kept for resume (a fit failing before
    # its first step leaves nothing: test_cli_json)
    assert (tmp_path / "out" / "checkpoints" / "checkpoint.npz").exists()
    assert f"xd-dask resume {tmp_path / 'out'}" in text
    events = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert not any(e.get("event") == "summary" for e in events)

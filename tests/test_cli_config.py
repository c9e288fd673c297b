"""CLI behaviour that needs no cluster: config errors (exit 2), info, sample."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.shared_data import GAIA_DIR
from xd_dask.cli import main
from xd_dask.model import XDModel
from xd_dask.params import Params


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def catalog_dir(tmp_path):
    """A real catalogue (1000 Gaia DR3 rows): its footers are read before a cluster starts."""
    d = tmp_path / "cat"
    d.mkdir()
    shutil.copy(GAIA_DIR / "dr3_allsky_1000.parquet", d / "part-0.parquet")
    return d


def _job(tmp_path, text: str):
    p = tmp_path / "job.toml"
    p.write_text(text)
    return str(p)


def _assert_usage_error(res, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, res.output
    for frag in fragments:
        assert frag in lines[0], lines[0]


def test_fit_unknown_key_exits_2_naming_it(runner, tmp_path, catalog_dir):
    job = _job(tmp_path, f'[catalog]\npath = "{catalog_dir}"\n[fit]\nn_component = 8\n')
    res = runner.invoke(main, ["fit", job])
    _assert_usage_error(res, "unknown key 'fit.n_component'", "did you mean 'fit.n_components'")


def test_fit_negative_k_exits_2(runner, tmp_path, catalog_dir):
    job = _job(tmp_path, f'[catalog]\npath = "{catalog_dir}"\n')
    res = runner.invoke(main, ["fit", job, "-k", "-3"])
    _assert_usage_error(res, "fit.n_components must be >= 1, got -3", "command line")
    res = runner.invoke(main, ["fit", job, "--set", "fit.n_components=-3"])
    _assert_usage_error(res, "fit.n_components must be >= 1")


def test_fit_missing_catalogue_or_job_file_exits_2(runner, tmp_path):
    job = _job(tmp_path, f'[catalog]\npath = "{tmp_path / "nowhere"}"\n')
    res = runner.invoke(main, ["fit", job])
    _assert_usage_error(res, "catalog.path", "nowhere", "no such file or directory")
    res = runner.invoke(main, ["fit", _job(tmp_path, "")])
    _assert_usage_error(res, "catalog.path is not set")
    res = runner.invoke(main, ["fit", str(tmp_path / "missing.toml")])
    _assert_usage_error(res, "missing.toml: no such job file")
    res = runner.invoke(main, ["fit", _job(tmp_path, "[fit\n")])
    _assert_usage_error(res, "not valid TOML")


def test_fit_bad_environment_value_exits_2(runner, tmp_path, catalog_dir):
    job = _job(tmp_path, f'[catalog]\npath = "{catalog_dir}"\n')
    res = runner.invoke(main, ["fit", job], env={"XD_DASK_FIT__METHOD": "sgd"})
    _assert_usage_error(res, "fit.method must be one of", "XD_DASK_FIT__METHOD")


def test_fit_refuses_to_overwrite_a_checkpointed_run(runner, tmp_path, catalog_dir):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    job = _job(tmp_path, f'[catalog]\npath = "{catalog_dir}"\n')
    res = runner.invoke(main, ["fit", job, "--out", str(out)])
    _assert_usage_error(res, "already holds the checkpoints", "xd-dask resume")


def test_nightly_without_holdout_holds_out_rows_by_id(tmp_path, catalog_dir):
    """A nightly job that holds out nothing scores its gate on rows held out by id hash (from
    every file), never whole (sky-ordered) files; the run's job.toml records it."""
    from xd_dask.jobs.config import load_config
    from xd_dask.jobs.nightly import DEFAULT_HOLDOUT_ROWS, run_nightly

    job = _job(
        tmp_path,
        f'[catalog]\npath = "{catalog_dir}"\n[fit]\nn_components = 2\nmax_iter = 2\ntol = 0.0\n'
        f'[nightly]\nstore = "{tmp_path / "models"}"\n[output]\nplots = false\n'
        "[cluster]\nn_workers = 1\n",
    )
    result = run_nightly(load_config(job, {}, {}))
    assert result.status == "promoted", result
    run_cfg = load_config(tmp_path / "models" / "latest" / "job.toml", {}, {})
    assert run_cfg.get("catalog.holdout_rows") == DEFAULT_HOLDOUT_ROWS


@pytest.fixture
def model_file(tmp_path):
    w = np.array([0.25, 0.75])
    m = np.array([[0.0, 10.0], [4.0, -2.0]])
    V = np.array([np.eye(2), [[2.0, 0.5], [0.5, 1.0]]])
    path = tmp_path / "model.npz"
    XDModel(Params(w, m, V), ["a", "b"], {"method": "em", "n_iter": 7}).save(path)
    return path


def test_info(runner, model_file, tmp_path):
    res = runner.invoke(main, ["info", str(model_file), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["n_components"] == 2 and d["features"] == ["a", "b"] and d["n_iter"] == 7
    assert d["weights_max"] == 0.75
    res = runner.invoke(main, ["info", str(model_file)])
    assert res.exit_code == 0 and "n_components" in res.output and "0.7500" in res.output
    res = runner.invoke(main, ["info", str(tmp_path / "none.npz")])
    _assert_usage_error(res, "none.npz: no such model file")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    _assert_usage_error(runner.invoke(main, ["info", str(bad)]), "corrupt or truncated")


def test_sample_writes_draws_from_the_model(runner, model_file, tmp_path):
    out = tmp_path / "s.parquet"
    res = runner.invoke(main, ["sample", str(model_file), "20000", str(out), "--seed", "5"])
    assert res.exit_code == 0, res.output
    t = pq.read_table(out)
    assert t.column_names == ["a", "b", "component"] and t.num_rows == 20000
    comp = t["component"].to_numpy()
    # component frequencies and the mixture mean (0.25 * m0 + 0.75 * m1) within ~5 sigma
    assert abs((comp == 1).mean() - 0.75) < 5 * np.sqrt(0.75 * 0.25 / 20000)
    a = t["a"].to_numpy()
    assert abs(a.mean() - 3.0) < 5 * a.std() / np.sqrt(20000)
    b1 = t["b"].to_numpy()[comp == 1]
    assert abs(b1.mean() + 2.0) < 5 / np.sqrt(b1.size)
    res = runner.invoke(main, ["sample", str(model_file), "0", str(out)])
    assert res.exit_code == 2


def test_gpu_without_cupy_is_a_usage_error(runner, tmp_path, catalog_dir):
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: the GPU path is tested in test_gpu.py")
    job = _job(tmp_path, f'[catalog]\npath = "{catalog_dir}"\n')
    res = runner.invoke(main, ["fit", job, "--gpu", "--out", str(tmp_path / "o")])
    _assert_usage_error(res, "gpu=True needs CuPy")

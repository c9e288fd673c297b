"""Job configuration: precedence, unknown keys, bad values, the shipped job files."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest
import tomllib

from xd_dask.config import job_keys
from xd_dask.config_docs import defaults_toml, markdown_table
from xd_dask.jobs.config import (
    ConfigError,
    _flatten,
    env_overrides,
    load_config,
    load_defaults,
    parse_assignment,
)

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_packaged_job_toml_is_generated_from_the_key_table():
    # job.toml documents exactly the table's job keys with their defaults, and is current
    text = (resources.files("xd_dask") / "defaults" / "job.toml").read_text()
    assert text == defaults_toml(), (
        "regenerate: python -m xd_dask.config > xd_dask/defaults/job.toml"
    )
    parsed = _flatten(tomllib.loads(text))
    assert parsed == {k.name: k.default for k in job_keys()} == _flatten(load_defaults())
    cfg = load_config(environ={})
    assert cfg.get("fit.n_components") == 16 and cfg.sources == {}


def test_readme_fit_keys_table_is_the_key_table():
    readme = (REPO / "README.md").read_text()
    assert markdown_table("fit") in readme, "python -m xd_dask.config --write README.md"
    for name in ("background", "background_weight", "max_ll_drop"):  # the robust-EM keys
        assert f"| `{name}` |" in readme


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path):
    job = _write(tmp_path, "[fit]\nn_components = 8\nmax_iter = 7\nseed = 3\n")
    env = {"XD_DASK_FIT__N_COMPONENTS": "9", "XD_DASK_FIT__MAX_ITER": "11"}
    cfg = load_config(job, {"fit.n_components": 10}, environ=env)
    assert cfg.get("fit.n_components") == 10  # CLI beats env and file
    assert cfg.get("fit.max_iter") == 11  # env beats file
    assert cfg.get("fit.seed") == 3  # file beats defaults
    assert cfg.get("fit.tol") == load_defaults()["fit"]["tol"]  # default
    assert cfg.sources["fit.n_components"] == "command line"
    assert cfg.sources["fit.max_iter"] == "environment XD_DASK_FIT__MAX_ITER"
    assert cfg.sources["fit.seed"] == f"job file {job}"


def test_env_nested_keys_typed_values_and_foreign_variables():
    env = {
        "XD_DASK_FIT__METHOD": "online",
        "XD_DASK_FIT__STEP__KAPPA": "0.75",
        "XD_DASK_CLUSTER__GPU": "true",
        "XD_DASK_PLOTS__FEATURES": '["bp_rp", "parallax"]',
        "XD_DASK_CATALOG__PATH": "2024",  # a string key stays a string
        "XD_DASK_BACKEND": "reference",  # the kernels' variable: not a job key, ignored
        "OTHER": "x",
    }
    cfg = load_config(environ=env)
    assert cfg.get("fit.step.kappa") == 0.75
    assert cfg.get("cluster.gpu") is True
    assert cfg.get("plots.features") == ["bp_rp", "parallax"]
    assert cfg.get("catalog.path") == "2024"
    with pytest.raises(ConfigError, match=r"XD_DASK_FIT__N_COMPONENT.*'fit.n_components'"):
        env_overrides({"XD_DASK_FIT__N_COMPONENT": "3"})


def test_unknown_keys_are_errors_naming_key_and_source(tmp_path):
    job = _write(tmp_path, "[fit]\nn_component = 8\n")
    with pytest.raises(ConfigError, match=r"job.toml: unknown key 'fit.n_component'.*n_components"):
        load_config(job, environ={})
    job = _write(tmp_path, "[fitting]\nn_components = 8\n", "b.toml")
    with pytest.raises(ConfigError, match=r"unknown key 'fitting.n_components'"):
        load_config(job, environ={})
    with pytest.raises(ConfigError, match=r"command line: unknown key 'n_components'"):
        load_config(overrides={"n_components": 3}, environ={})
    job = _write(tmp_path, "fit = 3\n", "c.toml")
    with pytest.raises(ConfigError, match="'fit' is a section"):
        load_config(job, environ={})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fit.n_components", -3, "fit.n_components must be >= 1, got -3"),
        ("fit.n_components", 2.5, "fit.n_components must be an integer"),
        ("fit.method", "sgd", "fit.method must be one of 'em', 'online'"),
        ("fit.step.kappa", 0.4, "fit.step.kappa must be > 0.5 (number in (0.5, 1]), got 0.4"),
        ("fit.tol", float("nan"), "fit.tol must be a finite number"),
        ("cluster.gpu", "yes", "cluster.gpu must be true or false"),
        ("deploy.walltime", "4h", "deploy.walltime must be HH:MM:SS"),
        ("deploy.worker_memory", "lots", "deploy.worker_memory must be a memory size"),
        ("plots.features", "bp_rp", "plots.features must be a list of names"),
        ("catalog.holdout_fraction", 1.5, "catalog.holdout_fraction must be <= 0.9"),
        ("catalog.holdout_rows", 0.6, "catalog.holdout_rows must be <= 0.5 (number in [0, 0.5])"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(overrides={key: value}, environ={})
    assert "command line" in str(info.value)


def test_cross_key_checks():
    with pytest.raises(ConfigError, match=r"'em' \(batch EM\) does not use fit.subsample"):
        load_config(overrides={"fit.subsample": 0.5}, environ={})
    load_config(overrides={"fit.subsample": 0.5, "fit.method": "online"}, environ={})
    with pytest.raises(ConfigError, match="catalog.holdout and catalog.holdout_fraction"):
        load_config(overrides={"catalog.holdout": "h", "catalog.holdout_fraction": 0.1}, environ={})
    with pytest.raises(ConfigError, match="fit.init must be 'kmeans' or a model file"):
        load_config(overrides={"fit.init": "random"}, environ={})


def test_check_inputs_reports_missing_catalogue(tmp_path):
    cfg = load_config(environ={})
    with pytest.raises(ConfigError, match="catalog.path is not set"):
        cfg.check_inputs()
    cfg = load_config(overrides={"catalog.path": str(tmp_path / "nope")}, environ={})
    with pytest.raises(ConfigError, match=r"catalog.path: .*nope.*no such file"):
        cfg.check_inputs()
    cfg = load_config(overrides={"catalog.path": str(tmp_path / "*.parquet")}, environ={})
    with pytest.raises(ConfigError, match="matches no files"):
        cfg.check_inputs()
    (tmp_path / "a.parquet").write_bytes(b"")
    cfg.check_inputs()  # the glob now matches; URLs are left to the manifest
    load_config(overrides={"catalog.path": "s3://bucket/x"}, environ={}).check_inputs()


def test_assignments_and_toml_round_trip(tmp_path):
    assert parse_assignment("fit.n_components=64") == ("fit.n_components", 64)
    assert parse_assignment("catalog.path = 2024") == ("catalog.path", "2024")
    assert parse_assignment("plots.features=['a','b']") == ("plots.features", ["a", "b"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_assignment("fit.n_components")
    over = {"fit.n_components": 5, "fit.method": "online", "fit.step.kind": "halving"}
    cfg = load_config(overrides=over, environ={})
    again = load_config(_write(tmp_path, cfg.to_toml()), environ={})
    assert again.data == cfg.data
    assert cfg.non_default() == over
    assert cfg.replace({"fit.seed": 4}).get("fit.seed") == 4
    with pytest.raises(ConfigError, match="fit.seed must be >= 0"):
        cfg.replace({"fit.seed": -1})


@pytest.mark.parametrize("name", ["demo.toml", "gaia-dr3-k256.toml", "nightly.toml"])
def test_shipped_job_files_load(name):
    cfg = load_config(REPO / "jobs" / name, environ={})
    if name == "gaia-dr3-k256.toml":  # the paper's set-up
        assert cfg.get("fit.n_components") == 256 and cfg.get("fit.method") == "online"
        assert cfg.get("fit.step.kind") == "halving"
        assert cfg.get("catalog.schema") == "gaia_dr3"


def test_repo_demo_job_is_the_packaged_demo_job():
    packaged = (resources.files("xd_dask") / "defaults" / "demo.toml").read_text()
    assert tomllib.loads((REPO / "jobs" / "demo.toml").read_text()) == tomllib.loads(packaged)

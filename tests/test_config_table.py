"""One typed configuration (issue 11.2): the key table gives the job-file checks, FitConfig and
the command-line options the same types, ranges and defaults."""

from __future__ import annotations

import dataclasses

import pytest
import tomli_w
from click.testing import CliRunner

from xd_dask.cli import main
from xd_dask.config import KEYS, Key, fit_keys, key, nest
from xd_dask.distributed import FitConfig
from xd_dask.jobs.config import ConfigError, load_config
from xd_dask.jobs.runner import fit_config
from xd_dask.optim.methods import InapplicableSettingWarning


def _other_value(k: Key):
    """A valid value different from the key's default."""
    if k.type is bool:
        return not k.default
    if k.choices:
        return next(c for c in k.choices if c != k.default)
    if k.name == "fit.init":
        return "start.npz"
    if k.type is str:
        return k.default + "-x" if k.default else "x"
    if k.type is int:
        return k.default + 3
    hi = k.hi if k.hi is not None else 2 * k.default + 1.0
    return (k.default + hi) / 2 if k.default != hi else hi / 2


def test_fit_config_fields_are_the_table_keys_with_its_defaults():
    fields = {f.name: f for f in dataclasses.fields(FitConfig)}
    table = {k.field: k for k in fit_keys()}
    assert set(fields) == set(table) | {"step", "checkpoint_dir", "performance_report"}
    cfg = FitConfig(catalog="c")
    for name, k in table.items():
        if name == "catalog":
            continue
        expected = None if k.has_unset and k.default == k.unset else k.default
        assert getattr(cfg, name) == expected, name
    step = {f.name: getattr(cfg.step, f.name) for f in dataclasses.fields(cfg.step)}
    assert step == {k.leaf: k.default for k in KEYS if k.section == "fit.step"}


def test_every_job_value_reaches_the_fit_config_unchanged(tmp_path):
    names = [k.name for k in fit_keys() if k.job] + [
        k.name for k in KEYS if k.section == "fit.step"
    ]
    values = {n: _other_value(key(n)) for n in names}
    values["fit.method"] = "online"  # fit.subsample needs it
    values["catalog.holdout_rows"] = 0.25
    values["fit.step.floor"] = 0.01  # <= lambda0 (a StepSchedule rule)
    job = tmp_path / "job.toml"
    job.write_text(tomli_w.dumps(nest(values)))
    # keys of other methods from a job file: named in a warning (max_iter, learning_rate), kept
    with pytest.warns(InapplicableSettingWarning, match="fit.learning_rate.*fit.max_iter"):
        cfg = load_config(job, environ={})
    fc = fit_config(cfg, checkpoint_dir="ck")
    for name, value in values.items():
        k = key(name)
        got = getattr(fc.step, k.leaf) if k.section == "fit.step" else getattr(fc, k.field)
        assert got == value, name
    assert fc.checkpoint_dir == "ck" and fc.split == (0.25, "train")
    # the one serialisation a checkpoint needs round-trips
    assert FitConfig.from_dict(fc.to_dict()) == fc


@pytest.mark.parametrize("k", [k for k in fit_keys() if k.lo is not None], ids=lambda k: k.name)
def test_job_file_and_fit_config_reject_the_same_values(k):
    bad = k.lo if k.lo_open else (k.lo - 1 if k.type is int else k.lo - 0.5)
    message = f"{k.name} must be {'>' if k.lo_open else '>='} {k.lo:g}"
    if k.job:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides={k.name: bad}, environ={})
    with pytest.raises(ValueError, match=message):
        FitConfig(**{"catalog": "c", k.field: bad})


def test_holdout_rows_has_one_range_everywhere(tmp_path):
    """It was <= 0.5 in job files, < 1 in FitConfig, (0, 0.5) and (0, 1) in two commands."""
    message = "catalog.holdout_rows must be <= 0.5"
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"catalog.holdout_rows": 0.6}, environ={})
    with pytest.raises(ValueError, match=message):
        FitConfig(catalog="c", holdout_rows=0.6)
    FitConfig(catalog="c", holdout_rows=0.5)
    (tmp_path / "cat").mkdir()
    runner = CliRunner()
    for args in (
        ["fit", "--catalog", str(tmp_path / "cat"), "--holdout-rows", "0.6"],
        ["score", "model.npz", "cat", "--holdout-rows", "0.6"],
    ):
        res = runner.invoke(main, args)
        assert res.exit_code == 2, res.output
        assert message in res.output and "--holdout-rows" in res.output, res.output


def test_cli_flags_are_the_keys_with_a_flag():
    res = CliRunner().invoke(main, ["fit", "--help"])
    assert res.exit_code == 0
    for k in KEYS:
        if k.flag and k.section in ("catalog", "fit", "cluster", "output"):
            assert k.flag.split("/")[-1] in res.output and f"[{k.name}" in res.output, k.name
    # a flag's value is checked by its key and named with the flag
    res = CliRunner().invoke(main, ["fit", "--catalog", ".", "--tol", "-1"])
    assert res.exit_code == 2
    assert "fit.tol must be >= 0, got -1 (set in command line --tol)" in res.output

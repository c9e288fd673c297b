"""`xd-dask demo` (the README's "run the main job" command), small, on its own local cluster."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from xd_dask.cli import main
from xd_dask.model import XDModel

pytestmark = pytest.mark.cluster


def test_demo_fits_close_to_the_generating_model(tmp_path):
    out = tmp_path / "demo-out"
    args = [
        "demo",
        "--out",
        str(out),
        "--rows",
        "20000",
        "--max-iter",
        "15",
        "--log-format",
        "json",
        "--set",
        "plots.n_samples=3000",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    events = [json.loads(ln) for ln in res.output.splitlines() if ln.startswith("{")]
    summary = events[-1]
    assert summary["event"] == "summary"
    model = XDModel.load(out / "model.npz")
    assert model.n_components == 12 and len(model.feature_names) == 7
    for name in (
        "model.npz",
        "history.json",
        "report.json",
        "corner.png",
        "sky.png",
        "training_curve.png",
        "catalog/true_model.npz",
    ):
        assert (out / name).is_file(), name
    # scored on an independent held-out sample: the fit is nearly as good as the truth
    fitted = summary["heldout_mean_loglike"]
    truth = summary["true_model_heldout_mean_loglike"]
    assert summary["heldout_rows"] == 2000
    assert truth - 0.5 < fitted < truth + 0.5, (fitted, truth)
    # a second run reuses the catalogue
    res = CliRunner().invoke(main, [*args[:-4], "--max-iter", "1"])
    assert res.exit_code == 0 and "Using the existing catalogue" in res.output

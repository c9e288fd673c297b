"""Row-level train / held-out split by source-id hash: the hash, the reader, a fit and a score."""

from __future__ import annotations

import numpy as np
import pytest

from tests.distributed_data import FEATURES, make_rows, rows_as_written, schema, write_catalog
from tests.mixtures import known_mixture_3d
from xd_dask.distributed import (
    FitConfig,
    build_manifest,
    fit_catalog,
    load_checkpoint,
    resume_fit,
    score_catalog,
)
from xd_dask.distributed.split import holdout_mask, side_mask, splitmix64
from xd_dask.distributed.tasks import TaskOptions, read_block
from xd_dask.model import XDModel
from xd_dask.params import Params

N, FIRST_ID, FRACTION = 2000, 1000, 0.2
MASK64 = (1 << 64) - 1


def _splitmix64_scalar(x: int) -> int:
    """The reference SplitMix64 step in plain Python integers (independent of NumPy)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _held_ref(ids) -> np.ndarray:
    return np.array([_splitmix64_scalar(int(i)) < FRACTION * 2.0**64 for i in ids])


def test_splitmix64_matches_the_reference_generator():
    assert int(splitmix64(np.array([0], dtype=np.int64))[0]) == 0xE220A8397B1DCDAF
    ids = np.r_[np.arange(20), [2**62 + 12345, 6917529027641081855, 4295098369]].astype(np.int64)
    got = splitmix64(ids)
    assert got.dtype == np.uint64
    assert [int(v) for v in got] == [_splitmix64_scalar(int(i)) for i in ids]


def test_holdout_fraction_and_sides():
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 2**62, size=200_000, dtype=np.int64)
    for f in (0.01, 0.05, 0.3):
        held = holdout_mask(ids, f)
        sigma = np.sqrt(f * (1 - f) / ids.size)
        assert abs(held.mean() - f) < 5 * sigma, (f, held.mean())
        np.testing.assert_array_equal(held, holdout_mask(ids.copy(), f))  # deterministic
        train = side_mask(ids, f, "train")
        assert not np.any(train & held) and np.all(train | held)
    # nested: a larger fraction holds out a superset of the rows
    assert np.all(holdout_mask(ids, 0.3)[holdout_mask(ids, 0.05)])
    assert not holdout_mask(ids, 0.0).any() and holdout_mask(ids, 1.0).all()
    with pytest.raises(ValueError, match="side"):
        side_mask(ids, 0.1, "test")


@pytest.fixture(scope="module")
def rows():
    return make_rows(seed=21, n=N)


@pytest.fixture(scope="module")
def cats(tmp_path_factory, rows):
    """The same rows as 1 file and as 5 files; and only the training rows as 1 file."""
    X, S = rows
    root = tmp_path_factory.mktemp("split")
    write_catalog(root / "one", X, S, 1, first_id=FIRST_ID)
    write_catalog(root / "five", X, S, 5, row_group_size=150, first_id=FIRST_ID)
    train = ~_held_ref(np.arange(FIRST_ID, FIRST_ID + N))
    return {k: str(root / k) for k in ("one", "five")}, train


def _side_ids(cat: str, side: str, max_rows=None) -> np.ndarray:
    opts = TaskOptions(schema(), split=(FRACTION, side))
    blocks = [read_block(p, opts) for p in build_manifest(cat, max_rows_per_partition=max_rows)]
    for b in blocks:
        assert b.X.shape[0] == b.X_cov.shape[0] == b.ids.shape[0]
    return np.concatenate([b.ids for b in blocks])


def test_read_block_split_is_independent_of_partitioning(cats):
    paths, train = cats
    all_ids = np.arange(FIRST_ID, FIRST_ID + N)
    held_ref = all_ids[~train]
    held_one = _side_ids(paths["one"], "holdout")
    held_five = _side_ids(paths["five"], "holdout")
    held_rg = _side_ids(paths["five"], "holdout", max_rows=150)  # runs of row groups
    np.testing.assert_array_equal(held_one, held_ref)
    np.testing.assert_array_equal(np.sort(held_five), held_ref)
    np.testing.assert_array_equal(np.sort(held_rg), held_ref)
    train_five = _side_ids(paths["five"], "train")
    assert np.intersect1d(train_five, held_five).size == 0
    np.testing.assert_array_equal(np.sort(np.r_[train_five, held_five]), all_ids)
    # every partition contributes rows to both sides (no whole-file hold-out)
    opts = TaskOptions(schema(), split=(FRACTION, "holdout"))
    for p in build_manifest(paths["five"]):
        blk = read_block(p, opts)
        assert 0 < blk.n_rows < blk.n_read == N // 5


def test_fit_config_round_trips_holdout_rows():
    cfg = FitConfig(catalog="x", n_components=2, schema=schema(), holdout_rows=0.05)
    back = FitConfig.from_dict(cfg.to_dict())
    assert back.holdout_rows == 0.05 and back.split == (0.05, "train")
    assert FitConfig(catalog="x", n_components=2).split is None
    with pytest.raises(ValueError, match="holdout_rows"):
        FitConfig(catalog="x", n_components=2, holdout_rows=1.0)


@pytest.mark.cluster
def test_fit_uses_train_rows_and_score_the_complement(client, cats, rows, tmp_path):
    paths, train = cats
    w, m, V = known_mixture_3d()
    init = tmp_path / "init.npz"
    XDModel(Params(w, m + 0.3, 1.4 * V), FEATURES).save(init)
    Xw, Sw = rows_as_written(*rows)
    n_train = int(train.sum())
    assert 0.7 * N < n_train < 0.9 * N

    def config(catalog, **kw):
        return FitConfig(
            catalog=catalog,
            n_components=3,
            schema=schema(),
            max_iter=3,
            tol=0.0,
            init=str(init),
            **kw,
        )

    ckpt = tmp_path / "ckpt"
    model = fit_catalog(
        config(paths["five"], holdout_rows=FRACTION, checkpoint_dir=str(ckpt)), client
    )
    md = model.metadata
    assert md["rows_used"] == n_train and md["rows_read"] == N
    assert md["holdout_rows"] == FRACTION and md["config"]["holdout_rows"] == FRACTION
    assert all(h["rows"] == n_train for h in md["history"])

    # the same fit on a catalogue holding only the training rows gives the same model
    ref_dir = tmp_path / "train-only"
    write_catalog(ref_dir, rows[0][train], rows[1][train], 1, first_id=0)
    ref = fit_catalog(config(str(ref_dir)), client)
    assert ref.metadata["rows_used"] == n_train
    np.testing.assert_allclose(model.means, ref.means, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.covariances, ref.covariances, rtol=1e-9, atol=1e-12)

    # the checkpoint carries the split; resuming the finished fit gives the same model
    assert load_checkpoint(ckpt)[1]["holdout_rows"] == FRACTION
    resumed = resume_fit(ckpt, client)
    np.testing.assert_array_equal(resumed.means, model.means)
    assert resumed.metadata["rows_used"] == n_train

    # scoring the held-out side scores exactly the complement
    held = ~train
    res = score_catalog(model, paths["five"], schema(), client, split=(FRACTION, "holdout"))
    assert res.n_rows == int(held.sum()) and res.n_read == N
    ll = model.log_density(Xw[held], Sw[held])
    assert res.mean_loglike == pytest.approx(ll.mean(), rel=1e-10)
    res_train = score_catalog(model, paths["five"], schema(), client, split=(FRACTION, "train"))
    assert res_train.n_rows == n_train
    assert res_train.total_loglike + res.total_loglike == pytest.approx(
        model.log_density(Xw, Sw).sum(), rel=1e-10
    )
    with pytest.raises(ValueError, match="split"):
        score_catalog(model, paths["five"], schema(), client, split=(FRACTION, "test"))


def test_score_cli_scores_one_side_of_the_split(cluster, cats, rows, tmp_path):
    import json

    from click.testing import CliRunner

    from xd_dask.cli import main

    paths, train = cats
    w, m, V = known_mixture_3d()
    model = XDModel(Params(w, m, V), FEATURES)
    model.save(tmp_path / "m.npz")
    Xw, Sw = rows_as_written(*rows)
    schema_file = tmp_path / "schema.toml"
    import tomli_w

    schema_file.write_text(tomli_w.dumps(schema().to_dict()))
    args = [
        "score",
        str(tmp_path / "m.npz"),
        paths["five"],
        "--schema",
        str(schema_file),
        "--scheduler-address",
        cluster.scheduler_address,
        "--log-format",
        "json",
    ]
    for side, sel in (("holdout", ~train), ("train", train)):
        res = CliRunner().invoke(main, args + ["--holdout-rows", str(FRACTION), "--side", side])
        assert res.exit_code == 0, res.output
        event = [json.loads(line) for line in res.output.splitlines() if '"score"' in line][-1]
        assert event["n_rows"] == int(sel.sum())
        assert event["mean_loglike"] == pytest.approx(
            model.log_density(Xw[sel], Sw[sel]).mean(), rel=1e-10
        )
    bad = CliRunner().invoke(main, args + ["--holdout-rows", "0.7"])
    assert bad.exit_code == 2 and "holdout-rows" in bad.output


# --------------------------------------------------------------------------- jobs layer
def test_job_config_holdout_rows_validation():
    from xd_dask.jobs.config import ConfigError, load_config

    assert load_config(environ={}).get("catalog.holdout_rows") == 0.0
    with pytest.raises(ConfigError, match="catalog.holdout_rows must be <= 0.5"):
        load_config(overrides={"catalog.holdout_rows": 0.6}, environ={})
    for other, value in (("catalog.holdout", "h"), ("catalog.holdout_fraction", 0.1)):
        with pytest.raises(ConfigError, match="give one of them"):
            load_config(overrides={"catalog.holdout_rows": 0.1, other: value}, environ={})


@pytest.fixture(scope="module")
def gaia_cat(tmp_path_factory):
    """A small synthetic Gaia-like catalogue (4 files) and its held-out mask by the hash."""
    from xd_dask.io import load_schema, make_catalog, read_partition

    out = tmp_path_factory.mktemp("gaia") / "cat"
    make_catalog(out, 2400, 4, seed=4)
    schema = load_schema("gaia_dr3")
    blocks = [read_partition(p, schema) for p in sorted(out.glob("*.parquet"))]
    X = np.concatenate([b.X for b in blocks])
    S = np.concatenate([b.X_cov for b in blocks])
    held = _held_ref(np.concatenate([b.ids for b in blocks]))
    return out, X, S, held


@pytest.mark.cluster
def test_job_and_nightly_score_the_held_out_rows(client, gaia_cat, tmp_path):
    from xd_dask.jobs.config import load_config
    from xd_dask.jobs.nightly import run_nightly
    from xd_dask.jobs.runner import run_fit

    cat, X, S, held = gaia_cat
    cfg = load_config(
        overrides={
            "catalog.path": str(cat),
            "catalog.holdout_rows": FRACTION,
            "fit.n_components": 2,
            "fit.max_iter": 2,
            "fit.tol": 0.0,
            "output.plots": False,
            "nightly.store": str(tmp_path / "store"),
        },
        environ={},
    )
    out = run_fit(cfg, client, out_dir=tmp_path / "fit")
    rep, model = out.report, out.model
    assert rep["rows_used"] == int((~held).sum()) and rep["rows_read"] == X.shape[0]
    assert rep["heldout_rows"] == int(held.sum()) > 0
    ll = model.log_density(X[held], S[held])
    assert rep["heldout_mean_loglike"] == pytest.approx(ll.mean(), rel=1e-10)
    assert tuple(model.metadata["job"]["heldout_split"]) == (FRACTION, "holdout")

    # nightly: the second night scores the previous model on the same held-out rows
    import datetime as dt

    t = dt.datetime(2024, 1, 1, 2, tzinfo=dt.timezone.utc)
    first = run_nightly(cfg, client=client, now=t)
    assert first.promoted, first["reason"]
    second = run_nightly(cfg, client=client, now=t + dt.timedelta(days=1))
    prev = XDModel.load(first.run_dir / "model.npz")
    assert second["previous_heldout_mean_loglike"] == pytest.approx(
        prev.log_density(X[held], S[held]).mean(), rel=1e-10
    )
    new = XDModel.load(second.run_dir / "model.npz")
    assert second["heldout_mean_loglike"] == pytest.approx(
        new.log_density(X[held], S[held]).mean(), rel=1e-10
    )

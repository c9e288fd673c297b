"""make-catalog: Gaia layout and dtypes, and the generator -> files -> reader round trip."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xd_dask.io import read_partition
from xd_dask.io import synthetic as syn
from xd_dask.io.healpix import ang2pix_nest
from xd_dask.model import XDModel

N_ROWS = 45_000
CHUNK = 10_000  # small chunks so the test crosses several chunk boundaries


@pytest.fixture(scope="module")
def small_chunks():
    mp = pytest.MonkeyPatch()
    mp.setattr(syn.rows, "CHUNK_ROWS", CHUNK)  # where generate_chunk and make_catalog read it
    yield
    mp.undo()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, small_chunks):
    out = tmp_path_factory.mktemp("cat") / "gaia"
    manifest = syn.make_catalog(out, N_ROWS, 3, seed=11)
    return out, manifest


@pytest.fixture(scope="module")
def truth(small_chunks):
    model = syn.true_mixture()
    parts = [
        syn.generate_chunk(11, c, N_ROWS, model, return_truth=True)
        for c in range((N_ROWS + CHUNK - 1) // CHUNK)
    ]
    rec = np.concatenate([p[0] for p in parts])
    keys = parts[0][1].keys()
    return rec, {k: np.concatenate([p[1][k] for p in parts]) for k in keys}


@pytest.fixture(scope="module")
def read_back(catalog):
    out, manifest = catalog
    blocks = [read_partition(out / f["name"]) for f in manifest["files"]]
    ids = np.concatenate([b.ids for b in blocks])
    row = ids & ((1 << 35) - 1)
    order = np.argsort(row)
    X = np.concatenate([b.X for b in blocks])[order]
    S = np.concatenate([b.X_cov for b in blocks])[order]
    return ids[order], row[order], X, S


def test_round_trip_covariances_equal_the_drawn_ones(read_back, truth):
    ids, row, X, S = read_back
    _, tr = truth
    np.testing.assert_array_equal(row, np.arange(N_ROWS))  # every row once
    S_true = tr["S"]
    d = np.sqrt(np.einsum("nii->ni", S_true))
    scale = np.maximum(d[:, :, None] * d[:, None, :], 1e-300)
    # errors and correlations are float32 columns: equal to float32 precision
    assert np.max(np.abs(S - S_true) / scale) < 4e-7
    assert np.max(np.abs(S - S_true) / scale) > 0  # really went through float32 columns
    # nulls exactly where the generator put them
    np.testing.assert_array_equal(np.isnan(X[:, 2:5]), np.repeat(tr["two_param"][:, None], 3, 1))
    np.testing.assert_array_equal(np.isnan(X[:, 5]), tr["missing_bp_rp"])
    assert not np.isnan(X[:, [0, 1, 6]]).any()


def test_observed_is_true_plus_noise_from_S(read_back, truth):
    """Whitened residuals (x - v) / S are standard normal: chi^2 per row averages d_i."""
    _, _, X, S = read_back
    _, tr = truth
    obs = ~np.isnan(X)
    r = np.where(obs, X - tr["v"], 0.0)
    r[:, 0] = (r[:, 0] + 180.0) % 360.0 - 180.0  # ra wraps at 0/360
    S_obs = np.where(obs[:, :, None] & obs[:, None, :], S, 0.0) + np.eye(7) * (~obs)[:, :, None]
    chi2 = np.einsum("ni,ni->n", r, np.linalg.solve(S_obs, r[:, :, None])[:, :, 0])
    dof = obs.sum(1)
    z = (chi2.sum() - dof.sum()) / np.sqrt(2 * dof.sum())
    assert abs(z) < 5, z
    # per feature, including the cos(dec) scaling of ra
    for j in range(7):
        w = r[obs[:, j], j] / np.sqrt(S[obs[:, j], j, j])
        assert abs(w.std() - 1.0) < 0.02, (j, w.std())


def test_layout_names_ids_and_manifest(catalog, read_back):
    out, manifest = catalog
    ids, _, X, _ = read_back
    files = manifest["files"]
    assert [f["name"] for f in files] == sorted(p.name for p in out.glob("*.parquet"))
    assert sum(f["n_rows"] for f in files) == N_ROWS == manifest["n_rows"]
    ranges = [f["healpix8"] for f in files]
    assert ranges[0][0] == 0 and ranges[-1][1] == 786431
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    for f in files:
        first, last = f["healpix8"]
        assert f["name"] == f"GaiaSource_{first:06d}-{last:06d}.parquet"
        t = pq.read_table(out / f["name"], columns=["source_id", "ra", "dec"])
        assert t.num_rows == f["n_rows"] > N_ROWS / 6  # roughly balanced
        sid = t["source_id"].to_numpy()
        assert ((sid >> 43) >= first).all() and ((sid >> 43) <= last).all()
        # source_id encodes the level-12 HEALPix pixel of the catalogue position
        lvl12 = ang2pix_nest(12, t["ra"].to_numpy(), t["dec"].to_numpy())
        np.testing.assert_array_equal(sid >> 35, lvl12)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not list(out.glob(".make-catalog-*"))  # spill removed
    assert (X[:, 0] >= 0).all() and (X[:, 0] < 360).all() and (np.abs(X[:, 1]) <= 90).all()


def test_gaia_dtypes_units_and_fractions(catalog):
    out, manifest = catalog
    t = pq.read_table(out / manifest["files"][0]["name"])
    sch = t.schema
    for name in ("source_id",):
        assert sch.field(name).type == pa.int64()
    for name in ("ra", "dec", "parallax", "pmra", "pmdec"):
        assert sch.field(name).type == pa.float64()
        assert sch.field(f"{name}_error").type == pa.float32()
    assert sch.field("ra_dec_corr").type == pa.float32()
    assert sch.field("pmra_pmdec_corr").type == pa.float32()
    assert sch.field("astrometric_params_solved").type == pa.int16()
    for name in ("phot_g_mean_mag", "bp_rp", "phot_g_mean_flux_over_error"):
        assert sch.field(name).type == pa.float32()
    assert sch.field("ra").metadata[b"unit"] == b"deg"
    assert sch.field("ra_error").metadata[b"unit"] == b"mas"
    aps = t["astrometric_params_solved"].to_numpy()
    assert set(np.unique(aps)) == {3, 31}
    two = aps == 3
    for c in ("parallax", "pmra_error", "parallax_pmdec_corr"):
        assert (t[c].is_null().to_numpy(zero_copy_only=False) == two).all()
    assert t["ra_dec_corr"].null_count == 0
    assert abs(manifest["observed_frac_two_param"] - 0.19) < 0.01
    assert abs(manifest["observed_frac_missing_bp_rp"] - 0.03) < 0.006
    # realistic error scales (5-parameter rows): median parallax error a few tenths of a mas
    pe = t["parallax_error"].to_numpy(zero_copy_only=False)
    assert 0.1 < np.nanmedian(pe) < 0.8


def test_true_model_file_is_the_generating_mixture(catalog, truth):
    out, _ = catalog
    model = XDModel.load(out / "true_model.npz")
    ref = syn.true_mixture()
    np.testing.assert_array_equal(model.weights, ref.weights)
    np.testing.assert_array_equal(model.means, ref.means)
    np.testing.assert_array_equal(model.covariances, ref.covariances)
    assert model.feature_names == [
        "ra",
        "dec",
        "parallax",
        "pmra",
        "pmdec",
        "bp_rp",
        "phot_g_mean_mag",
    ]
    assert sum(model.metadata["truncated_mass"]) < 0.01
    # the true values follow the model: mean and component share of the Pleiades-like blob
    v = truth[1]["v"]
    mean = model.weights @ model.means
    sd = np.sqrt(
        np.diag(
            np.einsum("k,kij->ij", model.weights, model.covariances)
            + np.cov(model.means.T, aweights=model.weights, bias=True)
        )
    )
    assert np.all(np.abs(v.mean(0) - mean) < 5 * sd / np.sqrt(N_ROWS) + 0.02 * sd)
    blob = (np.abs(v[:, 0] - 56.75) < 4) & (np.abs(v[:, 1] - 24.12) < 4) & (v[:, 2] > 6)
    assert abs(blob.mean() - 0.04) < 5 * np.sqrt(0.04 * 0.96 / N_ROWS)


def test_rows_do_not_depend_on_partitions_and_seed_matters(tmp_path, small_chunks):
    a = syn.make_catalog(tmp_path / "a", 12_000, 1, seed=4)
    b = syn.make_catalog(tmp_path / "b", 12_000, 4, seed=4)
    c = syn.make_catalog(tmp_path / "c", 12_000, 1, seed=5)
    assert len(b["files"]) == 4

    def rows(d, man):
        t = pa.concat_tables([pq.read_table(d / f["name"]) for f in man["files"]])
        return t.sort_by("source_id")

    ta, tb, tc = rows(tmp_path / "a", a), rows(tmp_path / "b", b), rows(tmp_path / "c", c)
    assert ta.equals(tb)
    assert not np.array_equal(ta["ra"].to_numpy(), tc["ra"].to_numpy())


def test_existing_output_needs_overwrite(tmp_path, small_chunks):
    syn.make_catalog(tmp_path, 2_000, 3, seed=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        syn.make_catalog(tmp_path, 2_000, 2, seed=1)
    syn.make_catalog(tmp_path, 2_000, 2, seed=1, overwrite=True)
    assert len(list(tmp_path.glob("GaiaSource_*.parquet"))) == 2  # stale files removed
    with pytest.raises(ValueError, match="fractions"):
        syn.make_catalog(tmp_path / "x", 10, 1, frac_two_param=1.5)


def test_partition_bounds_strictly_increasing():
    b = syn.partition_bounds(2000, seed=0)
    assert b[0] == 0 and b[-1] == 786432 and np.all(np.diff(b) > 0) and len(b) == 2001

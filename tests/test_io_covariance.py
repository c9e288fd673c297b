"""Covariance construction: hand-computed rows (units, cos dec, zero points) and real Gaia rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.shared_data import GAIA_DIR
from xd_dask.io import build_covariance, load_schema, plain_schema, read_partition
from xd_dask.io.healpix import ang2pix_nest, healpix_from_source_id

DATA = Path(__file__).parent / "data"
SHARED = GAIA_DIR
SAMPLES = [
    "gaia_dr3_cone_sample.parquet",
    "gaia_edr3_allsky_sample.parquet",
    "gaia_dr3_allsky_sample.parquet",
]
ASTRO = ["ra", "dec", "parallax", "pmra", "pmdec"]
CORR = [f"{a}_{b}_corr" for i, a in enumerate(ASTRO) for b in ASTRO[i + 1 :]]
PAIRS = [(i, j) for i in range(5) for j in range(i + 1, 5)]
K = 1.0857362047581294  # 2.5 / ln 10
ZP_G, ZP_BP, ZP_RP = 0.0027553202, 0.0027901700, 0.0037793818


def _hand_table() -> pa.Table:
    """Three rows: 5-parameter at dec = 60 deg, 2-parameter at dec = -30 without BP/RP,
    5-parameter at dec = 0."""
    corr5 = [0.1, -0.2, 0.05, 0.0, 0.3, -0.1, 0.15, 0.2, -0.05, 0.25]
    corr0 = [-0.3, 0.1, 0.2, -0.1, 0.0, 0.05, -0.2, 0.1, 0.3, -0.15]
    cols = {
        "source_id": [11, 22, 33],
        "ra": [10.0, 200.0, 359.5],
        "dec": [60.0, -30.0, 0.0],
        "parallax": [1.5, None, 0.2],
        "pmra": [-3.0, None, 7.0],
        "pmdec": [4.0, None, -1.0],
        "ra_error": [1.2, 3.0, 0.4],
        "dec_error": [0.9, 2.0, 0.3],
        "parallax_error": [0.5, None, 0.6],
        "pmra_error": [0.8, None, 0.7],
        "pmdec_error": [0.7, None, 0.9],
        "phot_g_mean_mag": [17.0, 20.5, 12.0],
        "phot_g_mean_flux_over_error": [100.0, 30.0, 2000.0],
        "bp_rp": [1.2, None, 0.7],
        "phot_bp_mean_flux_over_error": [20.0, None, 500.0],
        "phot_rp_mean_flux_over_error": [40.0, None, 800.0],
    }
    for k, name in enumerate(CORR):
        cols[name] = [corr5[k], 0.6 if k == 0 else None, corr0[k]]
    return pa.table(cols)


def _hand_expected() -> tuple[np.ndarray, np.ndarray]:
    """X and S written out by hand from the Gaia DR3 definitions."""
    nan = np.nan
    X = np.array(
        [
            [10.0, 60.0, 1.5, -3.0, 4.0, 1.2, 17.0],
            [200.0, -30.0, nan, nan, nan, nan, 20.5],
            [359.5, 0.0, 0.2, 7.0, -1.0, 0.7, 12.0],
        ]
    )
    S = np.zeros((3, 7, 7))
    # row 0: sigma(ra) = ra_error / (3.6e6 cos 60) deg = 1.2 / 1.8e6; sigma(dec) = 0.9 / 3.6e6.
    sig = [1.2 / 1.8e6, 0.9 / 3.6e6, 0.5, 0.8, 0.7]
    C = np.eye(5)
    for k, (a, b) in enumerate(PAIRS):
        C[a, b] = C[b, a] = [0.1, -0.2, 0.05, 0.0, 0.3, -0.1, 0.15, 0.2, -0.05, 0.25][k]
    S[0, :5, :5] = C * np.outer(sig, sig)
    S[0, 5, 5] = (K / 20.0) ** 2 + ZP_BP**2 + (K / 40.0) ** 2 + ZP_RP**2
    S[0, 6, 6] = (K / 100.0) ** 2 + ZP_G**2
    # row 1: 2-parameter; cos(-30 deg) = sqrt(3)/2.
    s_ra, s_dec = 3.0 / (3.6e6 * math.sqrt(3) / 2), 2.0 / 3.6e6
    S[1, 0, 0], S[1, 1, 1] = s_ra**2, s_dec**2
    S[1, 0, 1] = S[1, 1, 0] = 0.6 * s_ra * s_dec
    S[1, 6, 6] = (K / 30.0) ** 2 + ZP_G**2
    # row 2: dec = 0, cos = 1.
    sig = [0.4 / 3.6e6, 0.3 / 3.6e6, 0.6, 0.7, 0.9]
    C = np.eye(5)
    for k, (a, b) in enumerate(PAIRS):
        C[a, b] = C[b, a] = [-0.3, 0.1, 0.2, -0.1, 0.0, 0.05, -0.2, 0.1, 0.3, -0.15][k]
    S[2, :5, :5] = C * np.outer(sig, sig)
    S[2, 5, 5] = (K / 500.0) ** 2 + ZP_BP**2 + (K / 800.0) ** 2 + ZP_RP**2
    S[2, 6, 6] = (K / 2000.0) ** 2 + ZP_G**2
    return X, S


def test_hand_computed_rows_gaia_schema():
    res = build_covariance(_hand_table(), load_schema("gaia_dr3"))
    X, S = _hand_expected()
    assert res.reason.tolist() == [0, 0, 0]
    np.testing.assert_array_equal(np.isnan(res.X), np.isnan(X))
    np.testing.assert_allclose(res.X, X, rtol=0, atol=0, equal_nan=True)
    # relative to each entry's scale sqrt(S_aa S_bb): ra/dec variances are ~1e-13 deg^2
    scale = np.sqrt(np.einsum("nii->ni", S))
    scale = np.maximum(scale[:, :, None] * scale[:, None, :], 1e-300)
    assert np.max(np.abs(res.X_cov - S) / scale) < 1e-12
    # the cos(dec) factor: at dec = 60 deg sigma(ra) is twice ra_error / 3.6e6
    assert res.X_cov[0, 0, 0] == pytest.approx((2 * 1.2 / 3.6e6) ** 2, rel=1e-12)


def test_float32_output_rounds_the_float64_build():
    t = _hand_table()
    r64 = build_covariance(t, load_schema())
    r32 = build_covariance(t, load_schema(), dtype=np.float32)
    assert r32.X.dtype == np.float32 and r32.X_cov.dtype == np.float32
    np.testing.assert_array_equal(r32.X_cov, r64.X_cov.astype(np.float32))


def test_plain_schema_same_machinery():
    t = pa.table(
        {
            "x": [1.0, 2.0, None],
            "y": [3.0, 4.0, 5.0],
            "ex": [0.1, 0.2, 0.3],
            "ey": [0.5, 0.4, 0.3],
            "rxy": [0.5, -0.25, 0.9],
            "z": [7.0, 8.0, 9.0],
        }
    )
    sch = plain_schema(["x", "y", "z"], ["ex", "ey", 0.01], {("x", "y"): "rxy"})
    r = build_covariance(t, sch)
    assert r.reason.tolist() == [0, 0, 0]
    np.testing.assert_allclose(
        r.X_cov[0], [[0.01, 0.5 * 0.1 * 0.5, 0], [0.025, 0.25, 0], [0, 0, 1e-4]], rtol=1e-14
    )
    np.testing.assert_allclose(r.X_cov[1, 0, 1], -0.25 * 0.2 * 0.4, rtol=1e-14)
    # missing x: its row/column are zero, the correlation is not needed
    assert np.isnan(r.X[2, 0]) and r.X_cov[2, 0].tolist() == [0, 0, 0]
    assert r.X_cov[2, 1, 1] == pytest.approx(0.09)


@pytest.mark.parametrize(
    ("dtype", "error", "reason"),
    [
        (np.float32, 1e-25, "not_representable"),
        (np.float64, 1e-160, "not_representable"),
        (np.float64, 0.0, "not_positive_definite"),
    ],
)
def test_a_variance_that_underflows_is_not_representable(dtype, error, reason):
    """An error whose square is below the dtype's smallest normal number (1e-50 in float32,
    1e-320 in float64) is the working dtype's limit, like a square that overflows:
    not_representable (issue 19: it was reported as not_positive_definite); an error of exactly
    0 leaves S singular: not_positive_definite. The column named is the error's."""
    from xd_dask.io.rows import BAD_REASONS

    t = pa.table(
        {
            "x": [1.0, 2.0, 3.0],
            "y": [3.0, 4.0, 5.0],
            "ex": [0.1, error, 0.3],
            "ey": [0.5, 0.4, 1e30 if dtype == np.float32 else 1e200],  # row 2 overflows
        }
    )
    sch = plain_schema(["x", "y"], ["ex", "ey"])
    r = build_covariance(t, sch, dtype=dtype)
    assert r.reason.tolist() == [0, BAD_REASONS.index(reason),
                                 BAD_REASONS.index("not_representable")]  # fmt: skip
    assert r.columns[r.bad_column[1]] == "ex" and r.columns[r.bad_column[2]] == "ey"


def test_the_row_pass_is_generated_by_the_kernels_code_generator():
    """The schema row builder's code generator lives in kernels/codegen/rows.py and checks
    positive definiteness with the algebra's LDL^T (the kernels' pivots D_j, no square root):
    a correlation matrix whose second pivot is 1 - rho^2 <= PIVOT_TOL is rejected."""
    from xd_dask.io import covariance
    from xd_dask.io.rows import BAD_REASONS
    from xd_dask.kernels.codegen import rows

    sch = plain_schema(["x", "y"], ["ex", "ey"], {("x", "y"): "rxy"})
    src = rows.source(covariance._plan(sch), False, covariance._ROW_LAYOUT)
    assert "D1 = 1.0 - e1_0 * l1_0" in src and "iD1 = 1.0 / (D1 if D1 > 1e-12 else 1.0)" in src
    rho = [0.5, 1.0 - 1e-13, -1.0]
    t = pa.table({"x": [1.0] * 3, "y": [2.0] * 3, "ex": [1.0] * 3, "ey": [2.0] * 3, "rxy": rho})
    r = build_covariance(t, sch)
    pd = BAD_REASONS.index("not_positive_definite")
    assert r.reason.tolist() == [0, pd, pd]


def _reference_S(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-row reference straight from the Gaia DR3 data-model definitions."""

    def val(name):
        v = row[name]
        return np.nan if v is None else float(v)

    X = np.array([val(f) for f in ASTRO + ["bp_rp", "phot_g_mean_mag"]])
    S = np.zeros((7, 7))
    err = np.array([val(f"{a}_error") for a in ASTRO])
    err[0] /= 3.6e6 * math.cos(math.radians(val("dec")))
    err[1] /= 3.6e6
    for a in range(5):
        for b in range(5):
            if np.isnan(X[a]) or np.isnan(X[b]):
                continue
            if a == b:
                S[a, a] = err[a] ** 2
            else:
                lo, hi = min(a, b), max(a, b)
                S[a, b] = val(f"{ASTRO[lo]}_{ASTRO[hi]}_corr") * err[a] * err[b]
    if not np.isnan(X[5]):
        bp, rp = val("phot_bp_mean_flux_over_error"), val("phot_rp_mean_flux_over_error")
        S[5, 5] = (K / bp) ** 2 + ZP_BP**2 + (K / rp) ** 2 + ZP_RP**2
    if not np.isnan(X[6]):
        S[6, 6] = (K / val("phot_g_mean_flux_over_error")) ** 2 + ZP_G**2
    return X, S


@pytest.mark.parametrize("name", SAMPLES)
def test_real_rows_match_reference_and_are_positive_definite(name):
    path = DATA / name
    blk = read_partition(path)  # default schema; SOURCE_ID matched case-insensitively
    table = pq.read_table(path)
    rows = table.to_pylist()
    assert blk.n_read == len(rows) and blk.X.shape == (len(rows), 7)
    aps = np.array([r["astrometric_params_solved"] for r in rows])
    for i, row in enumerate(rows):
        X_ref, S_ref = _reference_S(row)
        np.testing.assert_array_equal(np.isnan(blk.X[i]), np.isnan(X_ref))
        d = np.sqrt(np.diag(S_ref))
        scale = np.maximum(np.outer(d, d), 1e-300)
        assert np.max(np.abs(blk.X_cov[i] - S_ref) / scale) < 1e-12, (name, i)
        obs = ~np.isnan(blk.X[i])
        np.linalg.cholesky(blk.X_cov[i][np.ix_(obs, obs)])  # positive definite
    two = aps == 3
    assert np.isnan(blk.X[two][:, 2:5]).all()
    assert not np.isnan(blk.X[~two][:, :5]).any()
    assert not np.isnan(blk.X[:, :2]).any()
    # bp_rp missing exactly where the archive has a null
    assert (np.isnan(blk.X[:, 5]) == np.array([r["bp_rp"] is None for r in rows])).all()
    ids = table.column([c for c in table.column_names if c.lower() == "source_id"][0])
    np.testing.assert_array_equal(blk.ids, ids.to_numpy())


def test_samples_cover_the_cases():
    """The copied rows include every case the tests above rely on."""
    t = pa.concat_tables(
        [
            pq.read_table(
                DATA / n,
                columns=["ra", "dec", "astrometric_params_solved", "bp_rp", "phot_g_mean_mag"],
            )
            for n in SAMPLES
        ]
    )
    aps = t["astrometric_params_solved"].to_numpy()
    assert {3, 31, 95} <= set(aps.tolist())
    assert t["bp_rp"].null_count >= 5 and t["phot_g_mean_mag"].null_count >= 3
    assert np.abs(t["dec"].to_numpy()).max() > 75  # cos(dec) far from 1


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared Gaia samples not available")
@pytest.mark.parametrize(
    "name",
    ["dr3_cone_ra45_dec0_r0.5.parquet", "dr3_allsky_1000.parquet", "edr3_allsky_1000.parquet"],
)
def test_full_shared_samples(name):
    blk = read_partition(SHARED / name, on_bad="drop")
    assert sum(blk.dropped.values()) == 0 and blk.n_rows == blk.n_read
    aps = pq.read_table(SHARED / name, columns=["astrometric_params_solved"]).column(0).to_numpy()
    five = aps != 3
    assert np.isnan(blk.X[~five][:, 2:5]).all() and not np.isnan(blk.X[five][:, :5]).any()
    np.linalg.cholesky(blk.X_cov[five][:, :5, :5])  # every 5/6-parameter row: PD astrometry


@pytest.mark.parametrize("name", SAMPLES)
def test_healpix_of_position_matches_source_id(name):
    """Our nested ang2pix against Gaia's own source_id encoding (positions are at J2016, the
    ids were assigned earlier, so a source near a pixel edge may differ at level 12)."""
    blk = read_partition(DATA / name)
    for level, min_agree in ((12, 0.9), (8, 0.95), (5, 1.0)):
        pix = ang2pix_nest(level, blk.X[:, 0], blk.X[:, 1])
        agree = np.mean(pix == healpix_from_source_id(blk.ids, level))
        assert agree >= min_agree, (level, agree)


def test_healpix_uniform_area():
    rng = np.random.default_rng(3)
    n = 480_000
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    counts = np.bincount(ang2pix_nest(2, ra, dec), minlength=192)
    assert counts.size == 192
    # equal-area pixels: Poisson scatter about n / 192 = 2500
    assert np.all(np.abs(counts - 2500) < 5 * 50)


def test_compiled_healpix_equals_vectorised():
    from xd_dask.io.healpix import ang2pix_nest_one

    rng = np.random.default_rng(8)
    ra = np.concatenate([rng.uniform(0, 360, 3000), [0.0, 359.9999999, 90.0, 180.0, 45.0]])
    dec = np.concatenate(
        [np.degrees(np.arcsin(rng.uniform(-1, 1, 3000))), [90.0, -90.0, 41.8103149, -41.81, 0.0]]
    )
    for level in (0, 5, 8, 12):
        ref = ang2pix_nest(level, ra, dec)
        got = np.array([ang2pix_nest_one(level, a, d) for a, d in zip(ra, dec, strict=True)])
        np.testing.assert_array_equal(got, ref)

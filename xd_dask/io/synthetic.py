"""Synthetic Gaia-DR3-like catalogues drawn from a known mixture (``xd-dask make-catalog``).

What is written
---------------
Parquet files with Gaia DR3 column names, units and dtypes (float64 positions, parallax and proper
motions; float32 errors, correlations and photometry; int16 ``astrometric_params_solved``),
``source_id`` encoding the level-12 HEALPix index of the position as Gaia does
(``source_id >> 35``), laid out like the DR3 bulk files: each file holds one contiguous range of
level-8 HEALPix pixels and is named ``GaiaSource_<first>-<last>.parquet`` after it. Beside them:
``true_model.npz`` (the generating mixture, :class:`xd_dask.model.XDModel`) and
``manifest.json`` (files, row counts, seed, schema, generator settings), written last.

The generating model
--------------------
True values v = (ra, dec, parallax, pmra, pmdec, bp_rp, phot_g_mean_mag), in the units of the
default schema, come from a 6-component Gaussian mixture loosely modelled on Gaia populations
(two broad field components, a bulge, an LMC-like cloud, two open clusters; :func:`true_mixture`).
Sky positions outside ra in [DELTA, 360 - DELTA], |dec| <= 90 - DELTA are rejected and redrawn
(DELTA = 1e-4 deg keeps the observed positions, true + mas-level noise, inside the Gaia ranges).
The components are chosen so that this truncation removes little mass: the written model is the
untruncated mixture and the rejected mass of each component is recorded in its metadata
(``truncated_mass``; about 6e-4 of all draws).

Noise: observed = true + e, e ~ N(0, S_i), with S_i drawn INDEPENDENTLY of v_i (XD assumes the
noise covariances carry no information about the true values; errors that depend on the true G
would bias a deconvolution). Each row gets an "error magnitude" m drawn from a Gaia-like G
distribution (21.4 - Gamma(1.6, 1.3)); the parallax error follows the EDR3 relation
sigma_plx = sqrt(40 + 800 z + 30 z^2) uas, z = 10^(0.4 (max(m, 13) - 15)), with log-normal scatter;
positions and proper motions scale with it; the 5 x 5 correlation matrix is that of A A^T for a
random unit upper-triangular A. Rows become 2-parameter solutions (parallax, proper motions, their
errors and 9 correlations null; astrometric_params_solved = 3; larger position errors, strongly
correlated ra/dec) with a probability rising with m, calibrated to ``frac_two_param`` (19 %);
BP and/or RP photometry is missing with a probability rising with m, calibrated to
``frac_missing_bp_rp`` (3 %). Missingness depends on m only, so it is independent of v (missing
completely at random, which the marginal likelihood handles exactly).

Streaming
---------
Rows are generated in chunks of :data:`CHUNK_ROWS` with a random stream per chunk
(``SeedSequence(seed, spawn_key=(chunk,))``), so the catalogue depends on (seed, n_rows) only, not
on the number of partitions. Each chunk's rows are appended to one spill file per output partition;
each partition is then converted to Parquet in row groups. Memory is bounded by the chunk and row
group sizes, whatever n_rows; the spill needs about 130 bytes per row of temporary disk space.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xd_dask.io.healpix import ang2pix_nest, ang2pix_nest_one, n_pixels
from xd_dask.io.schema import MAG_PER_LN_FLUX, load_schema
from xd_dask.model import XDModel
from xd_dask.params import Params
from xd_dask.utils import atomic_path, get_logger

__all__ = [
    "CHUNK_ROWS",
    "GAIA_COLUMNS",
    "ErrorModel",
    "generate_chunk",
    "make_catalog",
    "partition_bounds",
    "true_mixture",
]

log = get_logger(__name__)

#: Rows per generation chunk (fixed: part of what a seed means).
CHUNK_ROWS = 1 << 18
#: Margin (deg) kept between true positions and the ends of the ra/dec ranges.
DELTA = 1e-4
MAS_PER_DEG = 3.6e6
PARTITION_LEVEL = 8
MANIFEST = "manifest.json"
TRUE_MODEL = "true_model.npz"
FORMAT = "xd-dask synthetic gaia catalogue"
# Zero-point terms (mag) of the default schema's photometric errors.
ZP_G, ZP_BP, ZP_RP = 0.0027553202, 0.0027901700, 0.0037793818

_ASTRO = ("ra", "dec", "parallax", "pmra", "pmdec")
_CORR_PAIRS = [(a, b) for i, a in enumerate(_ASTRO) for b in _ASTRO[i + 1 :]]
_CORR_NAMES = [f"{a}_{b}_corr" for a, b in _CORR_PAIRS]
_PAIR_INDEX = [(a, b) for a in range(5) for b in range(a + 1, 5)]

#: (name, numpy dtype, unit, nullable) of the columns written, in Gaia DR3 order.
GAIA_COLUMNS: list[tuple[str, str, str, bool]] = [
    ("source_id", "i8", "", False),
    ("ra", "f8", "deg", False),
    ("ra_error", "f4", "mas", False),
    ("dec", "f8", "deg", False),
    ("dec_error", "f4", "mas", False),
    ("parallax", "f8", "mas", True),
    ("parallax_error", "f4", "mas", True),
    ("pmra", "f8", "mas.yr**-1", True),
    ("pmra_error", "f4", "mas.yr**-1", True),
    ("pmdec", "f8", "mas.yr**-1", True),
    ("pmdec_error", "f4", "mas.yr**-1", True),
    *[(c, "f4", "", c != "ra_dec_corr") for c in _CORR_NAMES],
    ("astrometric_params_solved", "i2", "", False),
    ("phot_g_mean_flux_over_error", "f4", "", False),
    ("phot_g_mean_mag", "f4", "mag", False),
    ("phot_bp_mean_flux_over_error", "f4", "", True),
    ("phot_rp_mean_flux_over_error", "f4", "", True),
    ("bp_rp", "f4", "mag", True),
]
# Spill record: fields sorted by size (8-, 4-, then 2-byte) and padded to a multiple of 8 bytes,
# so every field is aligned and a record buffer can be read as uint64 / uint32 / uint16 words.
_BY_SIZE = sorted(GAIA_COLUMNS, key=lambda c: -np.dtype(c[1]).itemsize)
_OFFSETS = np.cumsum([0] + [np.dtype(c[1]).itemsize for c in _BY_SIZE])
_RECORD = np.dtype(
    {
        "names": [c[0] for c in _BY_SIZE],
        "formats": [c[1] for c in _BY_SIZE],
        "offsets": [int(o) for o in _OFFSETS[:-1]],
        "itemsize": int(-(-_OFFSETS[-1] // 8) * 8),
    }
)


# --------------------------------------------------------------------------- the true mixture
def star_clusters(n: int, seed: int) -> list[tuple]:
    """``n`` compact, open-cluster-like components spread over the sky, in parallax, proper
    motion and the colour-magnitude diagram (the structured mixture of many components that a
    K = 64 / 128 benchmark needs): (name, weight, mean, sd, correlations) as in
    :func:`true_mixture`; weights sum to 1 before scaling."""
    rng = np.random.default_rng([int(seed), 29])
    w = rng.uniform(0.5, 1.5, n)
    out = []
    for i in range(n):
        plx = float(np.exp(rng.uniform(np.log(0.4), np.log(6.0))))
        mean = (
            float(rng.uniform(20.0, 340.0)),
            float(np.degrees(np.arcsin(rng.uniform(-0.85, 0.85)))),
            plx,
            float(rng.normal(0.0, 15.0)),
            float(rng.normal(0.0, 15.0)),
            float(rng.uniform(0.5, 2.0)),
            float(rng.uniform(12.0, 18.0)),
        )
        sd = (1.0, 1.0, 0.06 * plx, 0.6, 0.6, 0.3, 1.2)
        out.append((f"cluster {i}", float(w[i] / w.sum()), mean, sd, {(5, 6): 0.85}))
    return out


def true_mixture(n_clusters: int = 0, seed: int = 0, cluster_weight: float = 0.3) -> XDModel:
    """The generating mixture over (ra, dec, parallax, pmra, pmdec, bp_rp, phot_g_mean_mag): six
    broad components (disc, halo, bulge, a cloud, two open clusters) and, with ``n_clusters``,
    that many more compact clusters (:func:`star_clusters`, ``seed``) holding
    ``cluster_weight`` of the stars together."""
    # name, weight, mean (7), sd (7), correlations {(i, j): r}
    comps = [
        (
            "field disc",
            0.46,
            (180.0, 0.0, 1.0, -2.0, -3.0, 1.1, 17.8),
            (50.0, 25.0, 0.6, 5.0, 5.0, 0.35, 1.4),
            {(2, 6): -0.3, (3, 4): 0.2, (2, 4): -0.2, (5, 6): 0.2},
        ),
        (
            "thick disc / halo",
            0.26,
            (180.0, -5.0, 0.35, -3.0, -5.0, 0.95, 18.8),
            (45.0, 25.0, 0.3, 12.0, 12.0, 0.3, 1.2),
            {(2, 6): -0.2, (3, 4): 0.1},
        ),
        (
            "bulge",
            0.12,
            (266.4, -29.0, 0.12, -2.7, -7.0, 1.8, 18.6),
            (4.0, 3.5, 0.1, 2.8, 2.6, 0.4, 1.0),
            {(5, 6): 0.3, (3, 4): -0.1},
        ),
        (
            "LMC-like cloud",
            0.08,
            (80.9, -69.8, 0.02, 1.85, 0.3, 0.85, 19.3),
            (3.0, 1.6, 0.04, 0.35, 0.4, 0.35, 0.8),
            {(0, 3): 0.3, (1, 4): 0.3},
        ),
        (
            "open cluster A (Pleiades-like)",
            0.04,
            (56.75, 24.12, 7.35, 19.95, -45.4, 1.4, 14.5),
            (1.0, 1.0, 0.2, 1.2, 1.2, 0.6, 2.0),
            {(5, 6): 0.9},
        ),
        (
            "open cluster B (Praesepe-like)",
            0.04,
            (130.1, 19.67, 5.37, -36.1, -12.9, 1.3, 14.8),
            (1.2, 1.2, 0.15, 1.0, 1.0, 0.5, 1.8),
            {(5, 6): 0.85},
        ),
    ]
    if n_clusters:
        comps = [(c[0], c[1] * (1.0 - cluster_weight), *c[2:]) for c in comps]
        comps += [(c[0], c[1] * cluster_weight, *c[2:]) for c in star_clusters(n_clusters, seed)]
    weights, means, covs, trunc = [], [], [], []
    for _, w, m, sd, corr in comps:
        R = np.eye(7)
        for (i, j), r in corr.items():
            R[i, j] = R[j, i] = r
        sd_ = np.asarray(sd)
        weights.append(w)
        means.append(m)
        covs.append(R * np.outer(sd_, sd_))
        trunc.append(_truncated_mass(m[0], sd[0], m[1], sd[1]))
    schema = load_schema("gaia_dr3")
    meta = {
        "generator": "xd_dask.io.synthetic.true_mixture",
        "components": [c[0] for c in comps],
        "units": list(schema.units),
        "truncation": {"ra": [DELTA, 360.0 - DELTA], "dec": [-90.0 + DELTA, 90.0 - DELTA]},
        "truncated_mass": trunc,
        "note": "generating mixture of the TRUE values before rejection of sky positions "
        "outside the truncation box (rejected mass per component: truncated_mass)",
    }
    return XDModel(
        Params(np.array(weights), np.array(means), np.array(covs)),
        feature_names=list(schema.features),
        metadata=meta,
    )


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _truncated_mass(ra_m: float, ra_s: float, dec_m: float, dec_s: float) -> float:
    """Mass outside the sky box of a component with uncorrelated ra and dec."""
    p_ra = _phi((360.0 - DELTA - ra_m) / ra_s) - _phi((DELTA - ra_m) / ra_s)
    p_dec = _phi((90.0 - DELTA - dec_m) / dec_s) - _phi((-90.0 + DELTA - dec_m) / dec_s)
    return float(1.0 - p_ra * p_dec)


def _draw_true(rng: np.random.Generator, n: int, model: XDModel) -> np.ndarray:
    """(n, 7) i.i.d. draws from the mixture truncated to the sky box (rejection)."""
    L = np.linalg.cholesky(model.covariances)
    cum = np.cumsum(model.weights)
    out = np.empty((n, 7))
    filled = 0
    while filled < n:
        need = n - filled
        m = need + need // 50 + 16
        lab = np.minimum(np.searchsorted(cum, rng.random(m) * cum[-1], side="right"), len(cum) - 1)
        z = rng.standard_normal((m, 7))
        v = np.empty((m, 7))
        for k in range(len(cum)):
            sel = lab == k
            v[sel] = model.means[k] + z[sel] @ L[k].T
        ok = (v[:, 0] >= DELTA) & (v[:, 0] <= 360.0 - DELTA) & (np.abs(v[:, 1]) <= 90.0 - DELTA)
        v = v[ok][:need]
        out[filled : filled + len(v)] = v
        filled += len(v)
    return out


# --------------------------------------------------------------------------- the error model
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass(frozen=True)
class ErrorModel:
    """Gaia-like noise and missingness, all driven by an error magnitude m independent of v."""

    frac_two_param: float = 0.19
    frac_missing_bp_rp: float = 0.03
    m_top: float = 21.4
    gamma_shape: float = 1.6
    gamma_scale: float = 1.3
    two_param_width: float = 0.35
    bp_rp_width: float = 0.3

    @cached_property
    def m_table(self) -> np.ndarray:
        """(4097,) quantiles of m = max(m_top - Gamma(shape, scale), 3) at u = k / 4096; the
        generator draws m by linear interpolation in this table (cheaper than a gamma draw)."""
        from scipy.stats import gamma  # noqa: PLC0415

        u = np.linspace(0.0, 1.0, 4097)
        u[-1] = 1.0 - 1e-9
        g = gamma.ppf(u, self.gamma_shape, scale=self.gamma_scale)
        return np.maximum(self.m_top - g, 3.0)[::-1].copy()  # increasing in u

    @cached_property
    def two_param_centre(self) -> float:
        return self.threshold(self.frac_two_param, self.two_param_width)

    @cached_property
    def bp_rp_centre(self) -> float:
        return self.threshold(self.frac_missing_bp_rp, self.bp_rp_width)

    def threshold(self, frac: float, width: float) -> float:
        """Centre c with mean(sigmoid((m - c) / width)) = frac over the m distribution."""
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"fractions must be in [0, 1), got {frac}")
        if frac == 0.0:
            return 1e3  # sigmoid((m - 1e3) / width) underflows to 0
        t = self.m_table
        m = 0.5 * (t[1:] + t[:-1])  # midpoints of equal-probability cells
        lo, hi = 0.0, 40.0
        for _ in range(60):
            c = 0.5 * (lo + hi)
            if _sigmoid((m - c) / width).mean() > frac:
                lo = c
            else:
                hi = c
        return 0.5 * (lo + hi)


_LN10 = math.log(10.0)
_BP_OFFSET = 10.0 ** (0.2 * 0.35)  # flux-S/N scale of BP relative to G (BP ~ G + 0.35)
_RP_OFFSET = 10.0 ** (0.2 * -0.65)  # RP ~ G - 0.65


@numba.njit(cache=True, inline="always")
def _lognormal(rng, s):
    """exp(s N) to second order (cheap; positive for every N; used for small scatters s)."""
    x = s * rng.standard_normal()
    return 1.0 + x + 0.5 * x * x


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _gen_rows(
    rng, n, row0, cum, means, chol, m_table, c2, w2, cb, wb, bounds, rec, part, aux, want_aux
):
    """Draw n rows (global indices row0...) into the record array ``rec``; ``part`` receives the
    output partition of each row (``bounds``: level-8 pixel boundaries).

    aux (with want_aux) receives per row: v (7), sigma (5, native units), the 10 correlations,
    var(G), var(BP-RP), two-parameter flag, missing-BP/RP flag.
    """
    K = cum.shape[0]
    T = m_table.shape[0] - 1
    P = bounds.shape[0] - 1
    v = np.empty(7)
    z = np.empty(7)
    sig = np.empty(5)
    A = np.zeros((5, 5))
    M = np.empty((5, 5))
    dn = np.empty(5)
    y = np.empty(5)
    e = np.empty(5)
    ratios = (0.80, 0.70, 1.0, 1.10, 0.95)
    for i in range(n):
        # ---- true value: mixture draw, rejected outside the sky box
        while True:
            u = rng.random() * cum[K - 1]
            k = 0
            while k < K - 1 and cum[k] <= u:
                k += 1
            for a in range(7):
                z[a] = rng.standard_normal()
            for a in range(7):
                acc = means[k, a]
                for b in range(a + 1):
                    acc += chol[k, a, b] * z[b]
                v[a] = acc
            if v[0] >= DELTA and v[0] <= 360.0 - DELTA and abs(v[1]) <= 90.0 - DELTA:
                break
        # ---- error magnitude (quantile table) and missingness, independent of v
        u = rng.random() * T
        j = min(int(u), T - 1)
        m = m_table[j] + (u - j) * (m_table[j + 1] - m_table[j])
        two = rng.random() * (1.0 + math.exp(-(m - c2) / w2)) < 1.0  # u < sigmoid
        nobp = rng.random() * (1.0 + math.exp(-(m - cb) / wb)) < 1.0
        which = rng.random()
        bp_missing = nobp and (which < 0.5 or which >= 0.7)
        rp_missing = nobp and which >= 0.5
        # ---- astrometric errors (mas, mas/yr) and correlation matrix of A A^T
        zz = math.exp(0.4 * _LN10 * (max(m, 13.0) - 15.0))
        s_plx = math.sqrt(40.0 + 800.0 * zz + 30.0 * zz * zz) * 1e-3
        s_plx *= math.exp(0.25 * rng.standard_normal())
        for a in range(5):
            sig[a] = s_plx * ratios[a]
            if a != 2:
                sig[a] *= _lognormal(rng, 0.1)
        for a in range(5):
            A[a, a] = 1.0
            for b in range(a + 1, 5):
                A[a, b] = 0.25 * rng.standard_normal()
        for a in range(5):
            for b in range(a, 5):
                acc = 0.0
                for c in range(b, 5):
                    acc += A[a, c] * A[b, c]
                M[a, b] = acc
                M[b, a] = acc
        for a in range(5):
            dn[a] = 1.0 / math.sqrt(M[a, a])
        for a in range(5):
            y[a] = rng.standard_normal()
        for a in range(5):
            acc = 0.0
            for c in range(a, 5):
                acc += A[a, c] * y[c]
            e[a] = sig[a] * dn[a] * acc
        r01 = M[0, 1] * dn[0] * dn[1]
        # 2-parameter solutions: larger, strongly correlated position errors
        n_s2 = rng.standard_normal()
        n_rho = rng.standard_normal()
        z2 = rng.standard_normal()
        if two:
            s2 = 3.8 * math.exp(0.3 * _LN10 * (m - 20.8) + 0.9 * n_s2)
            rho2 = min(max(math.tanh(0.55 + n_rho), -0.995), 0.995)
            sig[0] = 1.05 * s2
            sig[1] = s2
            r01 = rho2
            e[0] = sig[0] * y[0]
            e[1] = sig[1] * (rho2 * y[0] + math.sqrt(1.0 - rho2 * rho2) * z2)
        # ---- photometric errors
        t = math.exp(0.2 * _LN10 * (m - 20.0))
        foe_g = _lognormal(rng, 0.15) / math.sqrt((t / 270.0) ** 2 + (1.0 / 4000.0) ** 2)
        tb = t * _BP_OFFSET
        foe_bp = _lognormal(rng, 0.2) / math.sqrt((tb / 22.0) ** 2 + (1.0 / 1500.0) ** 2)
        tr = t * _RP_OFFSET
        foe_rp = _lognormal(rng, 0.2) / math.sqrt((tr / 25.0) ** 2 + (1.0 / 2000.0) ** 2)
        qg = MAG_PER_LN_FLUX / foe_g
        qb = MAG_PER_LN_FLUX / foe_bp
        qr = MAG_PER_LN_FLUX / foe_rp
        var_g = qg * qg + ZP_G * ZP_G
        var_c = qb * qb + ZP_BP * ZP_BP + qr * qr + ZP_RP * ZP_RP
        g_noise = math.sqrt(var_g) * rng.standard_normal()
        c_noise = math.sqrt(var_c) * rng.standard_normal()
        # ---- observed row
        r = rec[i]
        ra_o = (v[0] + e[0] / (MAS_PER_DEG * math.cos(v[1] * (math.pi / 180.0)))) % 360.0
        dec_o = v[1] + e[1] / MAS_PER_DEG
        sid = (ang2pix_nest_one(12, ra_o, dec_o) << 35) | (row0 + i)
        r["source_id"] = sid
        # output partition: binary search of the level-8 pixel in bounds
        pix8 = sid >> (59 - 2 * PARTITION_LEVEL)
        lo = 0
        hi = P
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if bounds[mid] <= pix8:
                lo = mid
            else:
                hi = mid
        part[i] = lo
        r["ra"] = ra_o
        r["dec"] = dec_o
        r["ra_error"] = sig[0]
        r["dec_error"] = sig[1]
        r["ra_dec_corr"] = r01
        if two:
            r["parallax"] = np.nan
            r["parallax_error"] = np.nan
            r["pmra"] = np.nan
            r["pmra_error"] = np.nan
            r["pmdec"] = np.nan
            r["pmdec_error"] = np.nan
            r["ra_parallax_corr"] = np.nan
            r["ra_pmra_corr"] = np.nan
            r["ra_pmdec_corr"] = np.nan
            r["dec_parallax_corr"] = np.nan
            r["dec_pmra_corr"] = np.nan
            r["dec_pmdec_corr"] = np.nan
            r["parallax_pmra_corr"] = np.nan
            r["parallax_pmdec_corr"] = np.nan
            r["pmra_pmdec_corr"] = np.nan
            r["astrometric_params_solved"] = 3
        else:
            r["parallax"] = v[2] + e[2]
            r["parallax_error"] = sig[2]
            r["pmra"] = v[3] + e[3]
            r["pmra_error"] = sig[3]
            r["pmdec"] = v[4] + e[4]
            r["pmdec_error"] = sig[4]
            r["ra_parallax_corr"] = M[0, 2] * dn[0] * dn[2]
            r["ra_pmra_corr"] = M[0, 3] * dn[0] * dn[3]
            r["ra_pmdec_corr"] = M[0, 4] * dn[0] * dn[4]
            r["dec_parallax_corr"] = M[1, 2] * dn[1] * dn[2]
            r["dec_pmra_corr"] = M[1, 3] * dn[1] * dn[3]
            r["dec_pmdec_corr"] = M[1, 4] * dn[1] * dn[4]
            r["parallax_pmra_corr"] = M[2, 3] * dn[2] * dn[3]
            r["parallax_pmdec_corr"] = M[2, 4] * dn[2] * dn[4]
            r["pmra_pmdec_corr"] = M[3, 4] * dn[3] * dn[4]
            r["astrometric_params_solved"] = 31
        r["phot_g_mean_flux_over_error"] = foe_g
        r["phot_g_mean_mag"] = v[6] + g_noise
        r["phot_bp_mean_flux_over_error"] = np.nan if bp_missing else foe_bp
        r["phot_rp_mean_flux_over_error"] = np.nan if rp_missing else foe_rp
        r["bp_rp"] = np.nan if nobp else v[5] + c_noise
        if want_aux:
            for a in range(7):
                aux[i, a] = v[a]
            for a in range(5):
                aux[i, 7 + a] = sig[a]
            p = 0
            for a in range(5):
                for b in range(a + 1, 5):
                    aux[i, 12 + p] = r01 if p == 0 else M[a, b] * dn[a] * dn[b]
                    p += 1
            aux[i, 22] = var_g
            aux[i, 23] = var_c
            aux[i, 24] = 1.0 if two else 0.0
            aux[i, 25] = 1.0 if nobp else 0.0
    return 0


@numba.njit(cache=True, nogil=True)
def _group_by_partition(rec, part, n_partitions, out, counts):
    """Stable counting sort of rec[:n] by part into out; counts[p] = rows of partition p."""
    n = part.shape[0]
    for p in range(n_partitions):
        counts[p] = 0
    for i in range(n):
        counts[part[i]] += 1
    start = np.zeros(n_partitions, np.int64)
    for p in range(1, n_partitions):
        start[p] = start[p - 1] + counts[p - 1]
    for i in range(n):
        p = part[i]
        out[start[p]] = rec[i]
        start[p] += 1
    return 0


@numba.njit(cache=True, nogil=True)
def _records_to_columns(w64, w32, w16, i64, i32, i16, o64, o32, o16):
    """Transpose records read as words (w64 (n, r/8), w32 (n, r/4), w16 (n, r/2)) into column
    rows: o64[k] = w64[:, i64[k]], and likewise for 4- and 2-byte fields. One pass over the
    records, writing sequential column streams."""
    n = w64.shape[0]
    for i in range(n):
        for k in range(i64.shape[0]):
            o64[k, i] = w64[i, i64[k]]
        for k in range(i32.shape[0]):
            o32[k, i] = w32[i, i32[k]]
        for k in range(i16.shape[0]):
            o16[k, i] = w16[i, i16[k]]
    return 0


def _chunk_args(model: XDModel, errors: ErrorModel) -> tuple:
    return (
        np.cumsum(model.weights),
        model.means,
        np.linalg.cholesky(model.covariances),
        errors.m_table,
        errors.two_param_centre,
        errors.two_param_width,
        errors.bp_rp_centre,
        errors.bp_rp_width,
    )


def _chunk_rng(seed: int, chunk: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(chunk,)))


def generate_chunk(
    seed: int,
    chunk: int,
    n_rows_total: int,
    model: XDModel | None = None,
    errors: ErrorModel | None = None,
    *,
    return_truth: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """Rows of generation chunk ``chunk`` of a catalogue of ``n_rows_total`` rows.

    Returns
    -------
    records : structured array (dtype of :data:`GAIA_COLUMNS`; nulls are NaN).
    truth : with ``return_truth`` a dict: "v" (n, 7) true values; "S" (n, 7, 7) the noise
        covariance in feature units, computed here from the float64 draws (before the columns
        are rounded to float32) with the cos of the catalogue dec; "row" (n,) global row index;
        "two_param", "missing_bp_rp" (n,) flags. Else None.
    """
    model = true_mixture() if model is None else model
    errors = ErrorModel() if errors is None else errors
    start = chunk * CHUNK_ROWS
    n = max(0, min(CHUNK_ROWS, n_rows_total - start))
    rec = np.zeros(n, dtype=_RECORD)
    part = np.zeros(n, np.int64)
    aux = np.empty((n if return_truth else 1, 26))
    bounds = np.array([0, n_pixels(PARTITION_LEVEL)], np.int64)
    _gen_rows(_chunk_rng(seed, chunk), n, start, *_chunk_args(model, errors), bounds, rec, part,
              aux, return_truth)  # fmt: skip
    if not return_truth:
        return rec, None
    rows = np.arange(start, start + n, dtype=np.int64)
    v, sig, corr = aux[:, :7], aux[:, 7:12], aux[:, 12:22]
    two, nobp = aux[:, 24] > 0.5, aux[:, 25] > 0.5
    # Noise covariance in feature units: deg for ra (sigma(alpha*) / cos(dec)) and dec.
    sd = sig.copy()
    sd[:, 0] /= MAS_PER_DEG * np.cos(np.radians(rec["dec"]))
    sd[:, 1] /= MAS_PER_DEG
    S = np.zeros((n, 7, 7))
    for a in range(5):
        S[:, a, a] = sd[:, a] ** 2
    for p, (a, b) in enumerate(_PAIR_INDEX):
        S[:, a, b] = S[:, b, a] = corr[:, p] * sd[:, a] * sd[:, b]
    S[two, 2:5, :] = 0.0
    S[two, :, 2:5] = 0.0
    S[:, 5, 5] = np.where(nobp, 0.0, aux[:, 23])
    S[:, 6, 6] = aux[:, 22]
    return rec, {"v": v, "S": S, "row": rows, "two_param": two, "missing_bp_rp": nobp}


# --------------------------------------------------------------------------- layout + writing
def partition_bounds(
    n_partitions: int, seed: int, model: XDModel | None = None, n_pilot: int = 200_000
) -> np.ndarray:
    """(P + 1,) level-8 pixel boundaries: file p holds pixels [b[p], b[p+1]).

    Chosen at quantiles of a pilot sample of the true sky distribution, so files hold similar
    numbers of rows; strictly increasing.
    """
    npix = n_pixels(PARTITION_LEVEL)
    if not 1 <= n_partitions <= npix:
        raise ValueError(f"n_partitions must be in 1..{npix}, got {n_partitions}")
    model = true_mixture() if model is None else model
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31,)))
    v = _draw_true(rng, n_pilot, model)
    pix = np.sort(ang2pix_nest(PARTITION_LEVEL, v[:, 0], v[:, 1]))
    q = pix[(np.arange(1, n_partitions) * n_pilot) // n_partitions]
    b = np.concatenate([[0], q, [npix]]).astype(np.int64)
    for i in range(1, n_partitions):  # strictly increasing, room left for the rest
        b[i] = min(max(b[i], b[i - 1] + 1), npix - (n_partitions - i))
    return b


def partition_name(first: int, last: int) -> str:
    return f"GaiaSource_{first:06d}-{last:06d}.parquet"


def _arrow_schema(generator_meta: dict[str, Any]) -> pa.Schema:
    fields = []
    for name, dt, unit, nullable in GAIA_COLUMNS:
        meta = {b"unit": unit.encode()} if unit else None
        fields.append(
            pa.field(name, pa.from_numpy_dtype(np.dtype(dt)), nullable=nullable, metadata=meta)
        )
    return pa.schema(fields, metadata={b"xd_dask": json.dumps(generator_meta).encode()})


def _word_index(size: int) -> np.ndarray:
    return np.array(
        [_RECORD.fields[c[0]][1] // size for c in GAIA_COLUMNS if np.dtype(c[1]).itemsize == size],
        np.int64,
    )


_WORDS = {size: _word_index(size) for size in (8, 4, 2)}
_WORD_TYPES = {8: np.uint64, 4: np.uint32, 2: np.uint16}


def _to_table(rec: np.ndarray, schema: pa.Schema, scratch: dict | None = None) -> pa.Table:
    """Arrow table of records (NaN -> null in nullable columns), via one compiled transpose."""
    n = len(rec)
    raw = np.ascontiguousarray(rec).view(np.uint8).reshape(n, _RECORD.itemsize)
    words, outs = [], []
    for size in (8, 4, 2):
        words.append(raw.view(_WORD_TYPES[size]))
        out = None if scratch is None else scratch.get(size)
        if out is None or out.shape[1] < n:
            out = np.empty((len(_WORDS[size]), n), _WORD_TYPES[size])
            if scratch is not None:
                scratch[size] = out
        outs.append(out[:, :n])
    _records_to_columns(*words, _WORDS[8], _WORDS[4], _WORDS[2], *outs)
    arrays, slot = [], {8: 0, 4: 0, 2: 0}
    for _, dt, _, nullable in GAIA_COLUMNS:
        size = np.dtype(dt).itemsize
        col = outs[(8, 4, 2).index(size)][slot[size]].view(dt)
        slot[size] += 1
        arrays.append(pa.array(col, mask=np.isnan(col)) if nullable else pa.array(col))
    return pa.Table.from_arrays(arrays, schema=schema)


def _read_spill(path: Path, n_rows: int, block_rows: int):
    """The records of a spill file, ``block_rows`` at a time (bounded memory)."""
    if n_rows == 0:
        return
    with open(path, "rb") as fh:
        for start in range(0, n_rows, block_rows):
            count = min(block_rows, n_rows - start)
            block = np.fromfile(fh, dtype=_RECORD, count=count)
            if len(block) != count:
                raise OSError(f"{path}: spill file shorter than expected")
            yield block


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not out.exists():
        return
    ours = [*out.glob("GaiaSource_*.parquet"), out / MANIFEST, out / TRUE_MODEL]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a catalogue ({existing[0].name}, ...); use overwrite=True "
            "(--overwrite) to replace it"
        )
    for p in existing:  # remove the old catalogue's files (the manifest goes first)
        if p.name == MANIFEST:
            p.unlink()
    for p in existing:
        if p.exists():
            p.unlink()


def make_catalog(
    out_dir: str | os.PathLike,
    n_rows: int,
    n_partitions: int = 1,
    seed: int = 0,
    *,
    frac_two_param: float = 0.19,
    frac_missing_bp_rp: float = 0.03,
    row_group_size: int = 1 << 17,
    compression: str = "snappy",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    n_clusters: int = 0,
) -> dict[str, Any]:
    """Write a synthetic Gaia-DR3-like catalogue (see the module docstring) and its true model.

    Parameters
    ----------
    out_dir : output directory (created).
    n_rows : total rows.
    n_partitions : number of Parquet files (HEALPix level-8 ranges).
    seed : random seed; (seed, n_rows) determine the rows, n_partitions only the layout.
    frac_two_param, frac_missing_bp_rp : target fractions of 2-parameter rows and rows without
        BP/RP photometry.
    row_group_size : rows per Parquet row group.
    compression : Parquet codec.
    overwrite : replace a catalogue already in ``out_dir``.
    progress : called as progress(rows_done, n_rows) during generation.
    n_clusters : add this many compact star clusters to the generating mixture
        (:func:`true_mixture`; 58 give a structured mixture of 64 components).

    Returns
    -------
    The manifest (also written to ``out_dir/manifest.json``).
    """
    if n_rows < 0 or n_rows >= 1 << 35:
        raise ValueError(f"n_rows must be in 0..2**35-1, got {n_rows}")
    if row_group_size < 1:
        raise ValueError("row_group_size must be >= 1")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = true_mixture(n_clusters, seed)
    errors = ErrorModel(frac_two_param=frac_two_param, frac_missing_bp_rp=frac_missing_bp_rp)
    errors.two_param_centre, errors.bp_rp_centre  # noqa: B018 - validates the fractions
    bounds = partition_bounds(n_partitions, seed, model)
    names = [partition_name(int(bounds[p]), int(bounds[p + 1]) - 1) for p in range(n_partitions)]
    gen_meta = {
        "format": FORMAT,
        "seed": seed,
        "n_rows": n_rows,
        "schema": "gaia_dr3",
        "frac_two_param": frac_two_param,
        "frac_missing_bp_rp": frac_missing_bp_rp,
    }
    arrow_schema = _arrow_schema(gen_meta)
    counts = np.zeros(n_partitions, np.int64)
    chunk_counts = np.zeros(n_partitions, np.int64)
    n_two = n_nobp = 0
    n_chunks = (n_rows + CHUNK_ROWS - 1) // CHUNK_ROWS
    args = _chunk_args(model, errors)
    size = min(CHUNK_ROWS, max(n_rows, 1))
    rec = np.zeros(size, dtype=_RECORD)  # buffers reused by every chunk
    grouped = np.zeros(size, dtype=_RECORD)
    part = np.zeros(size, np.int64)
    aux = np.empty((1, 26))
    scratch: dict = {}  # transpose buffers reused by every row group

    def chunks():
        """Generate the chunks in order into the reused buffers; yields rows, partitions."""
        nonlocal n_two, n_nobp
        for c in range(n_chunks):
            n = min(CHUNK_ROWS, n_rows - c * CHUNK_ROWS)
            _gen_rows(_chunk_rng(seed, c), n, c * CHUNK_ROWS, *args, bounds, rec, part, aux,
                      False)  # fmt: skip
            n_two += int(np.count_nonzero(rec["astrometric_params_solved"][:n] == 3))
            n_nobp += int(np.count_nonzero(np.isnan(rec["bp_rp"][:n])))
            yield rec[:n], part[:n]
            if progress is not None:
                progress(c * CHUNK_ROWS + n, n_rows)

    def write_partition(p: int, blocks) -> None:
        """Write one output file atomically from an iterable of record blocks."""
        with atomic_path(out / names[p], suffix=".parquet") as tmp:
            with pq.ParquetWriter(
                tmp,
                arrow_schema,
                compression=compression,
                use_dictionary=False,
                write_statistics=["source_id"],
            ) as w:
                empty = True
                for block in blocks:
                    w.write_table(
                        _to_table(block, arrow_schema, scratch), row_group_size=row_group_size
                    )
                    empty = False
                if empty:
                    w.write_table(_to_table(np.zeros(0, _RECORD), arrow_schema))
            os.chmod(tmp, 0o644)

    if n_partitions == 1:  # one file: stream the chunks straight into it
        counts[0] = n_rows
        write_partition(0, (r for r, _ in chunks()))
        t_gen = time.perf_counter() - t0
    else:  # group each chunk by partition, spill, then convert each partition's spill file
        spill = Path(tempfile.mkdtemp(prefix=".make-catalog-", dir=out))
        try:
            for block, block_part in chunks():
                _group_by_partition(block, block_part, n_partitions, grouped, chunk_counts)
                start = 0
                for p in np.flatnonzero(chunk_counts):
                    stop = start + int(chunk_counts[p])
                    with open(spill / f"{p}.bin", "ab") as fh:
                        grouped[start:stop].tofile(fh)
                    start = stop
                counts += chunk_counts
            t_gen = time.perf_counter() - t0
            for p in range(n_partitions):
                src = spill / f"{p}.bin"
                write_partition(p, _read_spill(src, int(counts[p]), row_group_size))
                src.unlink(missing_ok=True)
        finally:
            shutil.rmtree(spill, ignore_errors=True)
    files = [
        {"name": names[p], "n_rows": int(counts[p]),
         "healpix8": [int(bounds[p]), int(bounds[p + 1]) - 1]}
        for p in range(n_partitions)
    ]  # fmt: skip
    model.metadata.update({"seed": seed, "n_rows": n_rows})
    model.save(out / TRUE_MODEL)
    elapsed = time.perf_counter() - t0
    manifest = {
        "format": FORMAT,
        "version": 1,
        "schema": "gaia_dr3",
        "seed": seed,
        "n_rows": int(n_rows),
        "n_partitions": n_partitions,
        "chunk_rows": CHUNK_ROWS,
        "partition_level": PARTITION_LEVEL,
        "frac_two_param": frac_two_param,
        "frac_missing_bp_rp": frac_missing_bp_rp,
        "observed_frac_two_param": n_two / n_rows if n_rows else 0.0,
        "observed_frac_missing_bp_rp": n_nobp / n_rows if n_rows else 0.0,
        "true_model": TRUE_MODEL,
        "files": files,
        "seconds": {"generate": round(t_gen, 3), "total": round(elapsed, 3)},
    }
    with atomic_path(out / MANIFEST, suffix=".json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o644)
    log.info(
        "make-catalog: %d rows in %d files under %s (%.1f s, %.0f rows/s)",
        n_rows,
        n_partitions,
        out,
        elapsed,
        n_rows / elapsed if elapsed > 0 else 0.0,
    )
    return manifest

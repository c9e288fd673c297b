"""Rows of a synthetic catalogue: the Gaia-like error model and the compiled row generator.

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

Rows are generated in chunks of :data:`CHUNK_ROWS` with a random stream per chunk
(``SeedSequence(seed, spawn_key=(chunk,))``), so the catalogue depends on (seed, n_rows) only.
The record fields written below are module constants named from the schema
(:mod:`xd_dask.io.synthetic.columns`); Numba compiles them in as field names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np
from scipy.stats import gamma

from xd_dask.codecache import numba_cache_ok
from xd_dask.io.healpix import ang2pix_nest_one, n_pixels
from xd_dask.io.schema import MAG_PER_LN_FLUX
from xd_dask.io.synthetic.columns import (
    ASTROMETRY,
    BP_FOE,
    COLOUR,
    CORR_NAMES,
    ERROR,
    G_FOE,
    ID,
    MAGNITUDE,
    MAS_PER_DEG,
    PAIR_INDEX,
    RECORD,
    RP_FOE,
    SOLVED,
    VALUE,
    ZP_BP,
    ZP_G,
    ZP_RP,
)
from xd_dask.io.synthetic.model import DELTA, true_mixture
from xd_dask.model import XDModel

_CACHE = numba_cache_ok(__file__)  # Numba's on-disk cache only where no one else writes

__all__ = ["CHUNK_ROWS", "PARTITION_LEVEL", "ErrorModel", "generate_chunk"]

#: Rows per generation chunk (fixed: part of what a seed means).
CHUNK_ROWS = 1 << 18
#: HEALPix level of the pixel ranges the output files hold.
PARTITION_LEVEL = 8

# Record field names (Numba needs them as constants; their values come from the schema).
_RA, _DEC, _PLX, _PMRA, _PMDEC = (VALUE[f] for f in ASTROMETRY)
_RA_ERR, _DEC_ERR, _PLX_ERR, _PMRA_ERR, _PMDEC_ERR = (ERROR[f] for f in ASTROMETRY)
_BP_RP, _G = VALUE[COLOUR], VALUE[MAGNITUDE]
_C01, _C02, _C03, _C04, _C12, _C13, _C14, _C23, _C24, _C34 = CORR_NAMES


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
_ASTRO_RATIOS = (0.80, 0.70, 1.0, 1.10, 0.95)  # sigma of ra, dec, plx, pmra, pmdec / sigma_plx

# The steps of _gen_rows, inlined into it (each draws from rng in the order a seed fixes).
_step = numba.njit(cache=_CACHE, nogil=True, error_model="numpy", inline="always")


@_step
def _lognormal(rng, s):
    """exp(s N) to second order (cheap; positive for every N; used for small scatters s)."""
    x = s * rng.standard_normal()
    return 1.0 + x + 0.5 * x * x


@_step
def _draw_true_row(rng, cum, means, chol, v, z):
    """A true value into v (7,): a mixture draw, rejected outside the sky box."""
    K = cum.shape[0]
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
            return


@_step
def _magnitude_and_missingness(rng, m_table, c2, w2, cb, wb):
    """Error magnitude m (quantile table) and the missingness flags it drives, independent of v:
    (m, two-parameter, no BP-RP, BP missing, RP missing)."""
    T = m_table.shape[0] - 1
    u = rng.random() * T
    j = min(int(u), T - 1)
    m = m_table[j] + (u - j) * (m_table[j + 1] - m_table[j])
    two = rng.random() * (1.0 + math.exp(-(m - c2) / w2)) < 1.0  # u < sigmoid
    nobp = rng.random() * (1.0 + math.exp(-(m - cb) / wb)) < 1.0
    which = rng.random()
    bp_missing = nobp and (which < 0.5 or which >= 0.7)
    rp_missing = nobp and which >= 0.5
    return m, two, nobp, bp_missing, rp_missing


@_step
def _astrometric_errors(rng, m, two, sig, A, M, dn, y, e):
    """Errors sig (5,) in mas (/yr), the correlation matrix M * dn dn^T of A A^T and the noise e
    (5,) they imply; 2-parameter rows get larger, strongly correlated position errors. Returns
    the ra/dec correlation."""
    zz = math.exp(0.4 * _LN10 * (max(m, 13.0) - 15.0))
    s_plx = math.sqrt(40.0 + 800.0 * zz + 30.0 * zz * zz) * 1e-3
    s_plx *= math.exp(0.25 * rng.standard_normal())
    for a in range(5):
        sig[a] = s_plx * _ASTRO_RATIOS[a]
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
    return r01


@_step
def _photometric_errors(rng, m):
    """(flux-over-error of G, BP, RP; var(G); var(BP-RP); G noise; BP-RP noise)."""
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
    return foe_g, foe_bp, foe_rp, var_g, var_c, g_noise, c_noise


@_step
def _partition_of(pix8, bounds):
    """Output partition of a level-8 pixel: binary search in ``bounds``."""
    lo = 0
    hi = bounds.shape[0] - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if bounds[mid] <= pix8:
            lo = mid
        else:
            hi = mid
    return lo


@_step
def _write_astrometry(r, v, e, sig, M, dn, r01, two):
    """The astrometric fields of record r (null parallax and proper motions in 2-p solutions)."""
    r[_RA_ERR] = sig[0]
    r[_DEC_ERR] = sig[1]
    r[_C01] = r01
    if two:
        r[_PLX] = np.nan
        r[_PLX_ERR] = np.nan
        r[_PMRA] = np.nan
        r[_PMRA_ERR] = np.nan
        r[_PMDEC] = np.nan
        r[_PMDEC_ERR] = np.nan
        r[_C02] = np.nan
        r[_C03] = np.nan
        r[_C04] = np.nan
        r[_C12] = np.nan
        r[_C13] = np.nan
        r[_C14] = np.nan
        r[_C23] = np.nan
        r[_C24] = np.nan
        r[_C34] = np.nan
        r[SOLVED] = 3
    else:
        r[_PLX] = v[2] + e[2]
        r[_PLX_ERR] = sig[2]
        r[_PMRA] = v[3] + e[3]
        r[_PMRA_ERR] = sig[3]
        r[_PMDEC] = v[4] + e[4]
        r[_PMDEC_ERR] = sig[4]
        r[_C02] = M[0, 2] * dn[0] * dn[2]
        r[_C03] = M[0, 3] * dn[0] * dn[3]
        r[_C04] = M[0, 4] * dn[0] * dn[4]
        r[_C12] = M[1, 2] * dn[1] * dn[2]
        r[_C13] = M[1, 3] * dn[1] * dn[3]
        r[_C14] = M[1, 4] * dn[1] * dn[4]
        r[_C23] = M[2, 3] * dn[2] * dn[3]
        r[_C24] = M[2, 4] * dn[2] * dn[4]
        r[_C34] = M[3, 4] * dn[3] * dn[4]
        r[SOLVED] = 31


@_step
def _write_aux(aux, i, v, sig, M, dn, r01, var_g, var_c, two, nobp):
    """Row i of aux: v (7), sigma (5), the 10 correlations, var(G), var(BP-RP), the two flags."""
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


@numba.njit(cache=_CACHE, nogil=True, error_model="numpy")
def _gen_rows(
    rng, n, row0, cum, means, chol, m_table, c2, w2, cb, wb, bounds, rec, part, aux, want_aux
):
    """Draw n rows (global indices row0...) into the record array ``rec``; ``part`` receives the
    output partition of each row (``bounds``: level-8 pixel boundaries).

    aux (with want_aux) receives per row: v (7), sigma (5, native units), the 10 correlations,
    var(G), var(BP-RP), two-parameter flag, missing-BP/RP flag.
    """
    v = np.empty(7)
    z = np.empty(7)
    sig = np.empty(5)
    A = np.zeros((5, 5))
    M = np.empty((5, 5))
    dn = np.empty(5)
    y = np.empty(5)
    e = np.empty(5)
    for i in range(n):
        _draw_true_row(rng, cum, means, chol, v, z)
        m, two, nobp, bp_missing, rp_missing = _magnitude_and_missingness(
            rng, m_table, c2, w2, cb, wb
        )
        r01 = _astrometric_errors(rng, m, two, sig, A, M, dn, y, e)
        foe_g, foe_bp, foe_rp, var_g, var_c, g_noise, c_noise = _photometric_errors(rng, m)
        # ---- observed row
        r = rec[i]
        ra_o = (v[0] + e[0] / (MAS_PER_DEG * math.cos(v[1] * (math.pi / 180.0)))) % 360.0
        dec_o = v[1] + e[1] / MAS_PER_DEG
        sid = (ang2pix_nest_one(12, ra_o, dec_o) << 35) | (row0 + i)
        r[ID] = sid
        part[i] = _partition_of(sid >> (59 - 2 * PARTITION_LEVEL), bounds)
        r[_RA] = ra_o
        r[_DEC] = dec_o
        _write_astrometry(r, v, e, sig, M, dn, r01, two)
        r[G_FOE] = foe_g
        r[_G] = v[6] + g_noise
        r[BP_FOE] = np.nan if bp_missing else foe_bp
        r[RP_FOE] = np.nan if rp_missing else foe_rp
        r[_BP_RP] = np.nan if nobp else v[5] + c_noise
        if want_aux:
            _write_aux(aux, i, v, sig, M, dn, r01, var_g, var_c, two, nobp)
    return 0


def chunk_args(model: XDModel, errors: ErrorModel) -> tuple:
    """The mixture and error-model arguments of :func:`_gen_rows`."""
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


def chunk_rng(seed: int, chunk: int) -> np.random.Generator:
    """The random stream of generation chunk ``chunk``."""
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
    rec = np.zeros(n, dtype=RECORD)
    part = np.zeros(n, np.int64)
    aux = np.empty((n if return_truth else 1, 26))
    bounds = np.array([0, n_pixels(PARTITION_LEVEL)], np.int64)
    _gen_rows(chunk_rng(seed, chunk), n, start, *chunk_args(model, errors), bounds, rec, part,
              aux, return_truth)  # fmt: skip
    if not return_truth:
        return rec, None
    return rec, _truth(rec, aux, start)


def _truth(rec: np.ndarray, aux: np.ndarray, start: int) -> dict[str, np.ndarray]:
    """The truth dict of :func:`generate_chunk` from the kernel's aux rows."""
    n = len(rec)
    rows = np.arange(start, start + n, dtype=np.int64)
    v, sig, corr = aux[:, :7], aux[:, 7:12], aux[:, 12:22]
    two, nobp = aux[:, 24] > 0.5, aux[:, 25] > 0.5
    # Noise covariance in feature units: deg for ra (sigma(alpha*) / cos(dec)) and dec.
    sd = sig.copy()
    sd[:, 0] /= MAS_PER_DEG * np.cos(np.radians(rec[_DEC]))
    sd[:, 1] /= MAS_PER_DEG
    S = np.zeros((n, 7, 7))
    for a in range(5):
        S[:, a, a] = sd[:, a] ** 2
    for p, (a, b) in enumerate(PAIR_INDEX):
        S[:, a, b] = S[:, b, a] = corr[:, p] * sd[:, a] * sd[:, b]
    S[two, 2:5, :] = 0.0
    S[two, :, 2:5] = 0.0
    S[:, 5, 5] = np.where(nobp, 0.0, aux[:, 23])
    S[:, 6, 6] = aux[:, 22]
    return {"v": v, "S": S, "row": rows, "two_param": two, "missing_bp_rp": nobp}

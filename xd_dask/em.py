"""EM updates from sufficient statistics (DESIGN.md section 4): batch, online, regularisation.

Everything here works on the statistics of :class:`xd_dask.kernels.SuffStats` and the current
parameters; nothing here touches rows.

Regularisation (``reg_form``)
-----------------------------
``"add"`` (default; scikit-learn's ``reg_covar`` and the minibatch EM of Ritchie & Murray 2019):
    V_j' = V_j^EM + reg I
``"bovy_w"`` (the reference C implementation's ``w``, for porting fits made with it):
    V_j' = (n_j V_j^EM + w I) / (n_j + 1)
    i.e. ``(sum_i r_ij [(b_ij - m_j')(b_ij - m_j')^T + B_ij] + w I) / (q_j + 1)`` of Bovy et al.
    with ``w = reg_covar``. Batch EM only.

Collapsed components
--------------------
A component counts as collapsed when its count n_j falls below ``min_count``, or its update is
not finite or not safely positive definite (:func:`is_pd`). The default ``min_count`` of batch EM
is the SUPPORT FLOOR ``min(D + 1, N / (2 K))`` rows (in units of the mean row weight; at least
``1e-6 x`` the total weight): a component that explains fewer rows than it needs to define a
D-dimensional covariance is memorising a few rows (typically one absurd row), not describing a
population. Online EM keeps the plain floor ``1e-6 x`` the wave's weight (a wave is a sample).

A collapsed component is re-seeded by splitting the heaviest component along its principal axis:
the two halves sit at m_h +- sqrt(lambda)/2 e with covariance V_h - lambda/4 e e^T each and half
the weight, which keeps the mixture's first and second moments. When rounding makes the split
covariance fail :func:`is_pd` (a component with eigenvalues 1e60 and 1e-2 loses the small ones to
rounding), the halves keep V_h itself instead (the first moment is kept, the second grows by
lambda/4 e e^T), so a re-seeded covariance is always one that already passed the check. The
indices are returned in ``EMUpdate.reseeded`` so that the caller can record them.

Background component
--------------------
With a uniform background (:class:`xd_dask.kernels.Background`, DESIGN.md 4d) the statistics carry
n_bg, the background's share of the rows; its weight is updated like any other, n_bg / W (batch),
or pooled like the s_j (online), and the Gaussian weights then sum to 1 - background weight. Its
box stays fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from xd_dask.kernels import SuffStats
from xd_dask.utils import get_logger

log = get_logger(__name__)

REG_FORMS = ("add", "bovy_w")


#: Smallest pivot^2 the Cholesky factor of a covariance's CORRELATION matrix may have
#: (:func:`is_pd`): about a condition number of 1e12, four decades above float64 rounding, so that
#: the kernels' own factorisations of V_j + S_i never meet a matrix that is PD only by accident.
PD_RTOL = 1e-12


@dataclass
class EMUpdate:
    """New parameters and what happened on the way.

    background_weight : the background component's new weight (0.0 without a background); the
    Gaussian ``weights`` sum to ``1 - background_weight``.
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    reseeded: list[int] = field(default_factory=list)
    background_weight: float = 0.0


def mean_loglike(stats: SuffStats) -> float:
    """Mean log-likelihood per (weighted) row."""
    if stats.W <= 0:
        raise ValueError("no rows (total weight 0): cannot compute a mean log-likelihood")
    return stats.ll / stats.W


def _check_reg(reg_covar: float, reg_form: str) -> None:
    if reg_form not in REG_FORMS:
        raise ValueError(f"reg_form must be one of {REG_FORMS}, got {reg_form!r}")
    if not (reg_covar >= 0 and math.isfinite(reg_covar)):
        raise ValueError(f"reg_covar must be finite and >= 0, got {reg_covar!r}")


def _floor(stats: SuffStats, min_count: float | None, support: bool = False) -> float:
    """Count below which a component is collapsed: ``min_count`` if given, else ``1e-6 W`` (at
    least 1e-10) and, with ``support``, at least the support floor min(D + 1, N / (2 K)) rows."""
    if min_count is not None:
        return float(min_count)
    floor = max(1e-6 * stats.W, 1e-10)
    if support and stats.n_rows > 0:
        K, D = stats.a.shape
        rows = min(D + 1.0, stats.n_rows / (2.0 * K))
        floor = max(floor, rows * stats.W / stats.n_rows)
    return floor


def batch_moments(
    stats: SuffStats,
    means: np.ndarray,
    covariances: np.ndarray,
    min_count: float | None = None,
    support: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unregularised batch-EM triple (n_j / W, m_j', V_j^EM) in the centred form.

        m_j' = m_j + V_j abar_j,  V_j^EM = V_j + V_j (C_j / n_j - abar_j abar_j^T) V_j,
        abar_j = a_j / n_j

    Returns
    -------
    s : (K,) n_j / W;  mu : (K, D);  sigma : (K, D, D);  ok : (K,) bool, False where the component
    collapsed (n_j below the floor, or a non-finite / non-positive-definite result). Entries of
    collapsed components are filled with the old parameters (finite, never NaN).
    ``support`` applies the support floor (module docstring) when ``min_count`` is None.
    """
    if stats.W <= 0:
        raise ValueError("no rows (total weight 0): nothing to update from")
    n = stats.n
    floor = _floor(stats, min_count, support)
    ok = n > floor
    n_safe = np.where(ok, n, 1.0)
    abar = stats.a / n_safe[:, None]  # (K, D)
    V = covariances
    mu = means + np.einsum("kij,kj->ki", V, abar)
    inner = stats.C / n_safe[:, None, None] - abar[:, :, None] * abar[:, None, :]  # (K, D, D)
    sigma = V + V @ inner @ V
    sigma = 0.5 * (sigma + np.swapaxes(sigma, 1, 2))
    finite = np.all(np.isfinite(mu), axis=1) & np.all(np.isfinite(sigma), axis=(1, 2))
    ok &= finite
    mu = np.where(ok[:, None], mu, means)
    sigma = np.where(ok[:, None, None], sigma, covariances)
    return n / stats.W, mu, sigma, ok


def _regularise(sigma: np.ndarray, n: np.ndarray, reg_covar: float, reg_form: str) -> np.ndarray:
    D = sigma.shape[-1]
    eye = np.eye(D)[None]
    if reg_form == "add":
        return sigma + reg_covar * eye
    return (n[:, None, None] * sigma + reg_covar * eye) / (n[:, None, None] + 1.0)


def is_pd(V: np.ndarray, rtol: float = PD_RTOL) -> np.ndarray:
    """(K,) bool: covariance j is finite, symmetric and safely positive definite.

    Safely: the Cholesky factor L of its correlation matrix (V scaled to unit diagonal, so the
    test does not depend on the units of the features) has min(diag L)^2 > ``rtol``.

    V : (K, D, D).
    """
    V = np.asarray(V, dtype=np.float64)
    out = np.zeros(V.shape[0], dtype=bool)
    for j in range(V.shape[0]):
        Vj = V[j]
        d = np.diagonal(Vj)
        if not (np.all(np.isfinite(Vj)) and np.all(d > 0)):
            continue
        if np.any(np.abs(Vj - Vj.T) > 1e-10 * np.abs(Vj).max()):
            continue
        s = 1.0 / np.sqrt(d)
        with np.errstate(over="ignore", invalid="ignore"):
            corr = Vj * s[:, None] * s[None, :]
        try:
            L = np.linalg.cholesky(corr)
        except np.linalg.LinAlgError:
            continue
        out[j] = bool(np.all(np.isfinite(L)) and np.min(np.diagonal(L)) ** 2 > rtol)
    return out


def _split(m_h: np.ndarray, V_h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offset ``delta`` (D,) and covariance (D, D) of the two halves of a split (module docs)."""
    evals, evecs = np.linalg.eigh(V_h)
    lam, e = evals[-1], evecs[:, -1]
    delta = 0.5 * math.sqrt(max(lam, 0.0)) * e
    V_half = V_h - np.outer(delta, delta)
    V_half = 0.5 * (V_half + V_half.T)
    if not is_pd(V_half[None])[0]:
        log.warning(
            "splitting loses precision (eigenvalues %.3g..%.3g): halves keep V", *evals[[0, -1]]
        )
        V_half = V_h.copy()
    return delta, V_half


def reseed_collapsed(
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    bad: np.ndarray,
    total: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Replace each component flagged in ``bad`` by half of the heaviest good component.

    The split keeps the mixture's first and second moments (see the module docstring); every
    covariance it writes has passed :func:`is_pd`. The returned weights sum to ``total`` (1, or
    1 - the background's weight).
    """
    w, m, V = weights.copy(), means.copy(), covariances.copy()
    reseeded = [int(j) for j in np.flatnonzero(bad)]
    good = ~bad
    if not good.any():
        raise FloatingPointError(
            "every mixture component collapsed; the data or the initialisation are degenerate "
            "(check the feature scaling and raise reg_covar)"
        )
    for j in reseeded:
        h = int(np.argmax(np.where(good, w, -np.inf)))
        delta, V_half = _split(m[h], V[h])
        m[j] = m[h] - delta
        m[h] = m[h] + delta
        V[h] = V_half
        V[j] = V_half
        w[h] = w[j] = 0.5 * w[h]
        good[j] = True
        log.warning("component %d collapsed; re-seeded by splitting component %d", j, h)
    return w / w.sum() * total, m, V, reseeded


def background_weight(share: float) -> float:
    """A background weight from its share of the rows (n_bg / W or the pooled s_bg), kept in
    [tiny, 0.5]: never exactly 0 (a weight of 0 would switch the background off for good) and
    never the bulk of the data (a box that explains most rows means the box or K is wrong)."""
    return float(min(max(share, np.finfo(np.float64).tiny), 0.5))


def _finish(s, mu, sigma, ok, n, reg_covar, reg_form, w_bg: float = 0.0) -> EMUpdate:
    V = _regularise(sigma, n, reg_covar, reg_form)
    ok = ok & is_pd(V) & (s > 0)
    w = np.where(ok, s, 0.0)
    if w.sum() <= 0:
        raise FloatingPointError("every mixture component collapsed")
    total = 1.0 - w_bg
    w = w / w.sum() * total
    if ok.all():
        return EMUpdate(w, mu, V, background_weight=w_bg)
    w, mu, V, reseeded = reseed_collapsed(w, mu, V, ~ok, total)
    return EMUpdate(w, mu, V, reseeded, w_bg)


def batch_update(
    stats: SuffStats,
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    *,
    reg_covar: float = 1e-6,
    reg_form: str = "add",
    min_count: float | None = None,
    background: bool = False,
) -> EMUpdate:
    """One batch-EM M-step (Bovy, Hogg & Roweis 2011, centred form) from whole-data statistics.

    Parameters
    ----------
    stats : statistics of all rows at the current parameters.
    weights : (K,), means : (K, D), covariances : (K, D, D) current parameters.
    reg_covar, reg_form : regularisation (module docstring).
    min_count : floor on n_j below which a component counts as collapsed (default: the support
        floor, module docstring).
    background : the statistics were computed with a background component: update its weight
        (n_bg / W) and scale the Gaussian weights to 1 - that.
    """
    _check_reg(reg_covar, reg_form)
    del weights  # the new weights depend on the statistics only
    s, mu, sigma, ok = batch_moments(stats, means, covariances, min_count, support=True)
    w_bg = background_weight(stats.n_bg / stats.W) if background else 0.0
    return _finish(s, mu, sigma, ok, stats.n, reg_covar, reg_form, w_bg)


@dataclass
class OnlineState:
    """Running estimate of online EM per component: (weight per row, mean, centred covariance),
    and the background's running share of the rows ``s_bg`` (0 without a background)."""

    s: np.ndarray  # (K,)
    mu: np.ndarray  # (K, D)
    sigma: np.ndarray  # (K, D, D)
    s_bg: float = 0.0

    @classmethod
    def from_params(cls, weights, means, covariances, background_weight=0.0) -> OnlineState:
        return cls(
            np.array(weights, dtype=np.float64),
            np.array(means, dtype=np.float64),
            np.array(covariances, dtype=np.float64),
            float(background_weight),
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"s": self.s, "mu": self.mu, "sigma": self.sigma, "s_bg": np.array(self.s_bg)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> OnlineState:
        return cls(
            np.array(arrays["s"]),
            np.array(arrays["mu"]),
            np.array(arrays["sigma"]),
            float(arrays.get("s_bg", 0.0)),
        )


def pool(
    state: OnlineState,
    s_w: np.ndarray,
    mu_w: np.ndarray,
    sig_w: np.ndarray,
    step: float,
    s_bg_w: float = 0.0,
) -> OnlineState:
    """Pool the running triple with a wave's triple with weights (1 - step) and step (the
    background's share ``s_bg`` is pooled like the s_j)."""
    l = float(step)
    a_old = (1.0 - l) * state.s  # (K,)
    a_new = l * s_w
    s = a_old + a_new
    s_safe = np.where(s > 0, s, 1.0)
    mu = (a_old[:, None] * state.mu + a_new[:, None] * mu_w) / s_safe[:, None]
    d_old = state.mu - mu
    d_new = mu_w - mu
    sig = (
        a_old[:, None, None] * (state.sigma + d_old[:, :, None] * d_old[:, None, :])
        + a_new[:, None, None] * (sig_w + d_new[:, :, None] * d_new[:, None, :])
    ) / s_safe[:, None, None]
    sig = 0.5 * (sig + np.swapaxes(sig, 1, 2))
    mu = np.where((s > 0)[:, None], mu, state.mu)
    sig = np.where((s > 0)[:, None, None], sig, state.sigma)
    return OnlineState(s, mu, sig, (1.0 - l) * state.s_bg + l * float(s_bg_w))


def online_update(
    state: OnlineState | None,
    stats: SuffStats,
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    step: float,
    *,
    reg_covar: float = 1e-6,
    reg_form: str = "add",
    min_count: float | None = None,
    background: bool = False,
) -> tuple[OnlineState, EMUpdate]:
    """One online-EM step (Cappe & Moulines 2009; pooled form of Ritchie & Murray 2019, App. A).

    The wave's own batch-EM triple (n_j / W, m_j', V_j^EM), computed from ``stats`` relative to
    the current parameters, is pooled with the running ``state`` with weights (1 - step, step).
    Parameters are then alpha = s / sum(s), m = mu, V = sigma + reg I. With ``step = 1`` and a
    wave holding all rows this is exactly :func:`batch_update`.

    ``state`` None starts from the current parameters. ``background``: the statistics carry a
    background component; its share is pooled and its weight is s_bg / (sum(s) + s_bg).
    """
    _check_reg(reg_covar, reg_form)
    if reg_form != "add":
        raise ValueError("online EM supports reg_form='add' only (the 'bovy_w' form needs counts)")
    if not (0.0 < step <= 1.0):
        raise ValueError(f"step size must be in (0, 1], got {step!r}")
    if state is None:
        state = OnlineState.from_params(weights, means, covariances)
    s_w, mu_w, sig_w, ok = batch_moments(stats, means, covariances, min_count)
    # A component that got (almost) no rows in this wave contributes (almost) nothing: give it
    # zero weight in the pool rather than calling it collapsed.
    s_w = np.where(ok, s_w, 0.0)
    new = pool(state, s_w, mu_w, sig_w, step, stats.n_bg / stats.W if background else 0.0)
    V = new.sigma + reg_covar * np.eye(new.sigma.shape[-1])[None]
    ok_run = (new.s > _floor(stats, min_count) / max(stats.W, 1e-300)) & is_pd(V)
    ok_run &= np.all(np.isfinite(new.mu), axis=1)
    w = np.where(ok_run, new.s, 0.0)
    if w.sum() <= 0:
        raise FloatingPointError("every mixture component collapsed")
    w_bg = background_weight(new.s_bg / (w.sum() + new.s_bg)) if background else 0.0
    w = w / w.sum() * (1.0 - w_bg)
    if ok_run.all():
        return new, EMUpdate(w, new.mu, V, background_weight=w_bg)
    w, mu, V, reseeded = reseed_collapsed(w, new.mu, V, ~ok_run, 1.0 - w_bg)
    total = new.s.sum() + new.s_bg
    new = OnlineState(w * total, mu, V - reg_covar * np.eye(V.shape[-1])[None], new.s_bg)
    return new, EMUpdate(w, mu, V, reseeded, w_bg)


@dataclass(frozen=True)
class StepSchedule:
    """Step sizes lambda_t for online EM, t = 0, 1, 2, ... (waves).

    kind="power": lambda_t = min(1, (t + t0)^-kappa), kappa in (0.5, 1] (Cappe & Moulines).
    kind="halving": lambda_t = lambda0 for t < hold, then halved every ``every`` waves, never below
    ``floor`` (the constant-then-halved schedule of Ritchie & Murray 2019).
    """

    kind: str = "power"
    kappa: float = 0.6
    t0: float = 1.0
    lambda0: float = 0.1
    hold: int = 100
    every: int = 100
    floor: float = 1e-4

    def __post_init__(self) -> None:
        if self.kind not in ("power", "halving"):
            raise ValueError(f"step schedule kind must be 'power' or 'halving', got {self.kind!r}")
        if self.kind == "power":
            if not (0.5 < self.kappa <= 1.0):
                raise ValueError(f"kappa must be in (0.5, 1], got {self.kappa!r}")
            if not self.t0 >= 1.0:
                raise ValueError(f"t0 must be >= 1, got {self.t0!r}")
        else:
            if not (0.0 < self.lambda0 <= 1.0):
                raise ValueError(f"lambda0 must be in (0, 1], got {self.lambda0!r}")
            if self.hold < 0 or self.every < 1:
                raise ValueError("hold must be >= 0 and every >= 1")
            if not (0.0 < self.floor <= self.lambda0):
                raise ValueError("floor must be in (0, lambda0]")

    def __call__(self, t: int) -> float:
        if t < 0:
            raise ValueError("wave index must be >= 0")
        if self.kind == "power":
            return min(1.0, (t + self.t0) ** (-self.kappa))
        if t < self.hold:
            return self.lambda0
        halvings = 1 + (t - self.hold) // self.every
        return max(self.floor, self.lambda0 * 0.5**halvings)

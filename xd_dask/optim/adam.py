"""Adam on the mean log-likelihood as an update rule (Kingma & Ba 2015; the gradient-based XD of
Ritchie & Murray 2019), from the same per-wave statistics as EM (DESIGN.md section 4).

Unconstrained parameters theta (each wave moves all of them by one Adam step, uphill):

- ``z`` (K,) or (K + 1,) softmax logits of the weights, alpha = softmax(z) (the last entry is the
  background's weight when the mixture has one: its weight is fitted like the others);
- ``mu`` (K, D) the means in units of the components' scales s_j (D,): m_j = s_j * mu_j;
- ``L`` (K, D, D) lower-triangular Cholesky factors of the scaled covariances, V_j =
  diag(s_j) L_j L_j^T diag(s_j), with the LOGARITHM of the diagonal stored on the diagonal (so
  every theta gives a positive definite V_j; no projection, no re-seeding).

The scales s (K, D) (a rule-state array, fixed at :meth:`Adam.init`) are the starting
components' standard deviations per feature (:func:`component_scale`): Adam's step is about
``learning_rate`` in theta, i.e. a fraction of each component's own spread in every feature,
whatever the units (degrees, mas, magnitudes) and however narrow the component. With one scale
for the whole mixture (its spread per feature, :func:`mixture_scale`; the rule until 2026-12)
a step moved a narrow component by a fraction of the DATA's spread: at large K its parameters
jittered about the optimum by more than its own width until the rate had been halved several
times. Measured at the defaults on 500,000 rows of ``make-catalog --seed 7 --clusters 58`` (a
64-component generating mixture), held-out minus converged batch EM after epoch 1 / 5 / 10:
K = 64, -0.184 / -0.134 / -0.034 nats/row with one scale, -0.097 / -0.053 / -0.046 with the
components' (final +0.0013 instead of -0.0063); K = 128, -0.316 / -0.135 / -0.041 against
-0.173 / -0.026 / -0.009; K = 16 on 2,500,000 rows of the 6-component catalogue, -0.0085 / -0.0036
/ -0.0003 against -0.0059 / -0.0020 / -0.0000. An old checkpoint's (D,) scale still resumes.

Gradient of f = log L / W (mean log-likelihood) from a wave's statistics (n, a, C, W, n_bg):

    df/dz_k  = (n_k - alpha_k W) / W                (n_K = n_bg for the background)
    df/dmu_j = s_j * a_j / W
    df/dL_j  = tril(diag(s_j) C_j diag(s_j) L_j) / W  (from df/dV_j = C_j / 2W, V = D L L^T D)
    df/dlog L_j,ii = (df/dL_j)_ii L_j,ii

Rule state (saved in checkpoints): ``scale``; ``theta.z/mu/L``; Adam's first and second moments
``m1.*`` / ``m2.*`` of each block (step counts come from the loop's step index t).

Learning rate: lr_t = learning_rate x schedule(t) / schedule(0) x 2^-h. With a fixed budget
(``fit.tol = 0``) the fits use :func:`adam_schedule`: constant for the first half of the planned
steps, then halved every tenth of them (measured on a 60 000-row make-catalog catalogue, K = 8,
64 strata per epoch: 0.1 % below converged batch EM after 5 epochs; a constant rate stalled at
0.44 %). With a tolerance the rate follows the fit's progress instead (``plateau``): h counts the
epochs whose mean log-likelihood (every row once) rose by less than ``plateau``; Adam's step is
about the learning rate whatever the gradient, so only a smaller rate lets the fit settle within
the tolerance (rule state ``lr_scale``, ``epochs_seen``). Such a fit is not converged while
the rate is still at its start: at a constant rate Adam's parameters keep moving by about the rate
(a noise floor), and the epoch mean log-likelihood stops changing long before the fit is where
batch EM ends (measured: 2.5 M rows, K = 16, 64 strata per epoch, default rate: epochs 1-3 at
0.0059 / 0.0033 / 0.0042 nats/row below converged batch EM; 0.0080, flat within 3e-4 per epoch,
with one scale for the mixture). :meth:`Adam.settled`
therefore holds the stop until the rate has been halved ``SETTLED_HALVINGS`` times.
"""

from __future__ import annotations

import numpy as np

from xd_dask.config import key
from xd_dask.kernels import SuffStats
from xd_dask.optim.rules import StepData, Update
from xd_dask.optim.schedule import StepSchedule
from xd_dask.params import Background, Params

__all__ = [
    "Adam",
    "adam_schedule",
    "component_scale",
    "gradient",
    "mixture_scale",
    "params_from_theta",
    "theta_from_params",
]

BETA1 = 0.9
BETA2 = 0.999
EPS = 1e-8
_BLOCKS = ("z", "mu", "L")
SETTLED_HALVINGS = 3  # plateaus before a tolerance may stop a fit (module docstring)


def mixture_scale(params: Params) -> np.ndarray:
    """(D,) standard deviation per feature of the Gaussian part of ``params`` (its moments);
    a feature without spread gets 1."""
    w = np.asarray(params.weights, dtype=np.float64)
    w = w / w.sum()
    m, V = np.asarray(params.means), np.asarray(params.covariances)
    mbar = w @ m  # (D,)
    var = np.einsum("k,kd->d", w, np.diagonal(V, axis1=1, axis2=2) + (m - mbar) ** 2)
    return np.where(var > 0, np.sqrt(var), 1.0)


def component_scale(params: Params) -> np.ndarray:
    """(K, D) standard deviation of every component in every feature (the square roots of the
    covariances' diagonals; 1 where one is not positive)."""
    var = np.diagonal(np.asarray(params.covariances, dtype=np.float64), axis1=1, axis2=2)
    return np.where(var > 0, np.sqrt(np.maximum(var, 0.0)), 1.0)


def _outer(scale: np.ndarray) -> np.ndarray:
    """diag(s) . diag(s) as (1, D, D) for a scale (D,), or (K, D, D) for per-component (K, D)."""
    s = np.asarray(scale)
    if s.ndim == 1:
        return (s[:, None] * s[None, :])[None]
    return s[:, :, None] * s[:, None, :]


def theta_from_params(params: Params, scale: np.ndarray) -> dict[str, np.ndarray]:
    """The unconstrained parameters of ``params`` (module docstring)."""
    w = np.asarray(params.weights, dtype=np.float64)
    if params.background is not None:
        w = np.append(w, params.background_weight)
    z = np.log(w)
    z -= z.mean()
    mu = np.asarray(params.means) / scale
    Vs = np.asarray(params.covariances) / _outer(scale)
    L = np.linalg.cholesky(0.5 * (Vs + np.swapaxes(Vs, 1, 2)))
    idx = np.arange(L.shape[1])
    L[:, idx, idx] = np.log(L[:, idx, idx])
    return {"z": z, "mu": mu, "L": L}


def _cholesky(theta_L: np.ndarray) -> np.ndarray:
    L = np.tril(theta_L)
    idx = np.arange(L.shape[1])
    L[:, idx, idx] = np.exp(theta_L[:, idx, idx])
    return L


def params_from_theta(
    theta: dict[str, np.ndarray], scale: np.ndarray, background: Background | None
) -> Params:
    """The mixture of unconstrained parameters (module docstring); ``background`` gives the box
    (its weight comes from the last logit)."""
    z = theta["z"] - np.max(theta["z"])
    alpha = np.exp(z) / np.exp(z).sum()
    L = _cholesky(theta["L"])
    V = (L @ np.swapaxes(L, 1, 2)) * _outer(scale)
    V = 0.5 * (V + np.swapaxes(V, 1, 2))
    means = theta["mu"] * scale
    if background is None:
        return Params(alpha, means, V)
    return Params(alpha[:-1], means, V, background.with_weight(float(alpha[-1])))


def gradient(
    stats: SuffStats, theta: dict[str, np.ndarray], scale: np.ndarray
) -> dict[str, np.ndarray]:
    """Gradient of the mean log-likelihood ll / W with respect to theta, at the parameters the
    statistics were computed at (module docstring). Shapes as theta's."""
    W = float(stats.W)
    z = theta["z"] - np.max(theta["z"])
    alpha = np.exp(z) / np.exp(z).sum()
    n = np.asarray(stats.n, dtype=np.float64)
    if alpha.shape[0] == n.shape[0] + 1:
        n = np.append(n, stats.n_bg)
    g_z = (n - alpha * W) / W
    g_mu = np.asarray(stats.a) * scale / W
    L = _cholesky(theta["L"])
    Cs = np.asarray(stats.C) * _outer(scale)  # D C D
    g_L = np.tril(Cs @ L) / W
    idx = np.arange(L.shape[1])
    g_L[:, idx, idx] *= L[:, idx, idx]
    return {"z": g_z, "mu": g_mu, "L": g_L}


def adam_schedule(total_steps: int) -> StepSchedule:
    """Constant for the first half of ``total_steps``, then halved every tenth of them (at the
    end: 1/64 of the start)."""
    T = max(int(total_steps), 2)
    return StepSchedule("halving", lambda0=1.0, hold=T // 2, every=max(1, T // 10), floor=1e-3)


class Adam:
    """Adam ascent on the mean log-likelihood in the unconstrained parameters (module docstring).

    learning_rate : lr (units of theta: about a fraction of each component's spread; range and
        default from ``fit.learning_rate``).
    schedule : shape of the learning rate over the steps (default: constant).
    plateau : halve the rate after an epoch whose mean log-likelihood rose by less than this
        (nats per row; 0: never). Not monotone (each wave's statistics are over other rows).
    """

    name = "adam"
    monotone = False

    def __init__(
        self,
        learning_rate: float = key("fit.learning_rate").default,
        schedule: StepSchedule | None = None,
        plateau: float = 0.0,
    ) -> None:
        err = key("fit.learning_rate").validate(learning_rate)
        if err:
            raise ValueError(f"learning_rate {err}")
        if not plateau >= 0:
            raise ValueError(f"plateau must be >= 0, got {plateau!r}")
        self.learning_rate = float(learning_rate)
        self.schedule = schedule
        self.plateau = float(plateau)

    def step_size(self, t: int) -> float:
        if self.schedule is None:
            return self.learning_rate
        return self.learning_rate * self.schedule(t) / self.schedule(0)

    def settled(self, state: dict[str, np.ndarray]) -> bool:
        """Whether the loop's tolerance may stop the fit: with plateau halving, only after the
        rate was halved ``SETTLED_HALVINGS`` times (module docstring); a scheduled rate has no
        say (the budget ends the fit)."""
        if self.plateau <= 0:
            return True
        return float(state.get("lr_scale", 1.0)) <= 0.5**SETTLED_HALVINGS

    def init(self, params: Params) -> dict[str, np.ndarray]:
        scale = component_scale(params)
        theta = theta_from_params(params, scale)
        state = {"scale": scale, "lr_scale": np.array(1.0), "epochs_seen": np.array(0)}
        for b in _BLOCKS:
            state[f"theta.{b}"] = theta[b]
            state[f"m1.{b}"] = np.zeros_like(theta[b])
            state[f"m2.{b}"] = np.zeros_like(theta[b])
        return state

    def step(
        self, state: dict[str, np.ndarray], data: StepData, params: Params, t: int
    ) -> tuple[dict[str, np.ndarray], Update]:
        scale = np.asarray(state["scale"])
        theta = {b: np.asarray(state[f"theta.{b}"]) for b in _BLOCKS}
        grad = gradient(data.stats, theta, scale)
        lr_scale, seen = float(state.get("lr_scale", 1.0)), int(state.get("epochs_seen", 0))
        means = data.epoch_means
        if self.plateau > 0 and len(means) > seen:  # an epoch ended since the last step
            if len(means) >= 2 and means[-1] - means[-2] < self.plateau:
                lr_scale *= 0.5
            seen = len(means)
        lr = self.step_size(t) * lr_scale
        out = {"scale": scale, "lr_scale": np.array(lr_scale), "epochs_seen": np.array(seen)}
        c1, c2 = 1.0 - BETA1 ** (t + 1), 1.0 - BETA2 ** (t + 1)
        for b in _BLOCKS:
            g = grad[b]
            m1 = BETA1 * state[f"m1.{b}"] + (1.0 - BETA1) * g
            m2 = BETA2 * state[f"m2.{b}"] + (1.0 - BETA2) * g * g
            out[f"theta.{b}"] = theta[b] + lr * (m1 / c1) / (np.sqrt(m2 / c2) + EPS)
            out[f"m1.{b}"], out[f"m2.{b}"] = m1, m2
        new = params_from_theta({b: out[f"theta.{b}"] for b in _BLOCKS}, scale, params.background)
        return out, Update(new, [], lr)

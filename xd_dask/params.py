"""The mixture's parameters: one object that every layer passes whole (DESIGN.md 4e).

:class:`Params` holds the Gaussian weights (K,), means (K, D), covariances (K, D, D) and the
optional uniform :class:`Background` component. Kernels, worker tasks, update rules, the fitting
loop, checkpoints and model files all take and give a Params, so a mixture can never travel
without its background (a score that dropped the background came from passing (w, m, V) alone).

One serialiser (:meth:`Params.to_arrays` / :meth:`Params.from_arrays`) writes the arrays of model
files and checkpoints; :meth:`Params.to_json` / :meth:`Params.from_json` keep exact float lists for
JSON state (split-and-merge's saved parameters).

This module imports only NumPy (the bottom layer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ARRAY_NAMES", "Background", "Params"]

#: Names of the arrays :meth:`Params.to_arrays` writes (the background's only with one).
ARRAY_NAMES = (
    "weights",
    "means",
    "covariances",
    "background_weight",
    "background_lo",
    "background_hi",
)
_BACKGROUND = ARRAY_NAMES[3:]


@dataclass(frozen=True)
class Background:
    """A uniform background (outlier) component (DESIGN.md 4d; pygmmis' approach).

    The density of a row is ``sum_j alpha_j N(x_i | R_i m_j, T_ij) + weight / volume_i`` where
    ``volume_i`` is the volume of the box ``[lo, hi]`` over the row's OBSERVED fields (the
    marginal of a uniform box is uniform on the remaining fields), so the Gaussian weights
    alpha_j sum to ``1 - weight``. The box is fixed (in the units of the features); the weight
    is fitted. The noise is not convolved into the box: it is meant for rows far outside the
    Gaussians, whose errors are small against the box.

    weight : float in [0, 1).
    lo, hi : (D,) corners of the box, hi > lo, finite.
    """

    weight: float
    lo: tuple[float, ...]
    hi: tuple[float, ...]

    def __post_init__(self) -> None:
        w = float(self.weight)
        if not (0.0 <= w < 1.0):
            raise ValueError(f"background weight must be in [0, 1), got {self.weight!r}")
        lo = np.asarray(self.lo, dtype=np.float64).ravel()
        hi = np.asarray(self.hi, dtype=np.float64).ravel()
        if lo.shape != hi.shape or lo.size == 0:
            raise ValueError(f"background box corners disagree: lo {lo.shape}, hi {hi.shape}")
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(hi > lo)):
            raise ValueError("background box must be finite with hi > lo in every column")
        with np.errstate(over="ignore", divide="ignore"):
            finite = np.all(np.isfinite(np.log(hi - lo)))
        if not finite:
            raise ValueError("background box is too large or too small to have a finite volume")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "lo", tuple(float(v) for v in lo))
        object.__setattr__(self, "hi", tuple(float(v) for v in hi))

    def with_weight(self, weight: float) -> Background:
        """The same box with another weight."""
        return Background(weight, self.lo, self.hi)

    @property
    def log_widths(self) -> np.ndarray:
        """(D,) log of the box's width along each feature."""
        return np.log(np.asarray(self.hi) - np.asarray(self.lo))

    def log_density(self, observed: Any) -> float | None:
        """Log density (weight included) on the fields ``observed`` (indices); None when the
        weight is 0."""
        if self.weight <= 0.0:
            return None
        return float(np.log(self.weight) - self.log_widths[observed].sum())


@dataclass(frozen=True)
class Params:
    """Mixture parameters: Gaussian ``weights`` (K,), ``means`` (K, D), ``covariances``
    (K, D, D), and an optional uniform ``background`` (the Gaussian weights then sum to
    ``1 - background.weight``).

    Construction only checks shapes (kernels accept any positive weights, e.g. during a
    line search); :meth:`validated` checks values. Arrays are stored as given (NumPy; the
    kernels move them to the rows' device).
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    background: Background | None = None

    def __post_init__(self) -> None:
        w, m, V = (np.asarray(a) for a in (self.weights, self.means, self.covariances))
        if w.ndim != 1 or m.ndim != 2 or V.ndim != 3:
            raise ValueError(
                "weights must be (K,), means (K, D), covariances (K, D, D); got shapes "
                f"{w.shape}, {m.shape}, {V.shape}"
            )
        K, D = m.shape
        if w.shape != (K,) or V.shape != (K, D, D) or K == 0 or D == 0:
            raise ValueError(
                f"shapes disagree: weights {w.shape}, means {m.shape}, covariances {V.shape}"
            )
        bg = self.background
        if bg is not None and len(bg.lo) != D:
            raise ValueError(f"background box has {len(bg.lo)} columns for {D} features")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "covariances", V)

    # ------------------------------------------------------------------ shape
    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.means.shape[1])

    @property
    def background_weight(self) -> float:
        return 0.0 if self.background is None else float(self.background.weight)

    @property
    def n_free(self) -> int:
        """Free parameters: (K - 1) weights (K with a background), K D means, K D (D + 1) / 2
        covariance entries."""
        K, D = self.n_components, self.n_features
        return K - 1 + (self.background is not None) + K * D + K * D * (D + 1) // 2

    @property
    def nbytes(self) -> int:
        return int(self.weights.nbytes + self.means.nbytes + self.covariances.nbytes)

    # ------------------------------------------------------------------ new parameters
    def replace(self, **changes: Any) -> Params:
        """A copy with some fields replaced (``weights=``, ``means=``, ``covariances=``,
        ``background=``)."""
        return dataclasses.replace(self, **changes)

    def with_gaussians(
        self, weights: Any, means: Any, covariances: Any, background_weight: float | None = None
    ) -> Params:
        """New Gaussian parameters; the background keeps its box and takes
        ``background_weight`` (None: keeps its weight)."""
        bg = self.background
        if bg is not None and background_weight is not None:
            bg = bg.with_weight(background_weight)
        return Params(weights, means, covariances, bg)

    def astype(self, dtype: Any) -> Params:
        """The parameters as arrays of ``dtype`` (float64 copies for updates and files)."""
        return Params(
            np.array(self.weights, dtype=dtype),
            np.array(self.means, dtype=dtype),
            np.array(self.covariances, dtype=dtype),
            self.background,
        )

    def validated(self) -> Params:
        """Float64 copies, checked: finite values, positive weights summing to 1 - the
        background's weight, symmetric positive definite covariances. ValueError names the
        component."""
        p = self.astype(np.float64)
        for name, arr in (
            ("weights", p.weights),
            ("means", p.means),
            ("covariances", p.covariances),
        ):
            if not np.all(np.isfinite(arr)):
                j = int(np.argwhere(~np.isfinite(arr))[0][0])
                raise ValueError(f"{name} of component {j} are not finite")
        w, V = p.weights, p.covariances
        if np.any(w <= 0):
            j = int(np.flatnonzero(w <= 0)[0])
            raise ValueError(f"weight of component {j} is {w[j]:g}; weights must be positive")
        total = 1.0 - self.background_weight
        if abs(w.sum() - total) > 1e-8:
            raise ValueError(f"weights must sum to {total:.12g}, they sum to {w.sum():.12g}")
        asym = np.abs(V - np.swapaxes(V, 1, 2)).max(axis=(1, 2))
        scale = np.abs(V).max(axis=(1, 2))
        bad = asym > 1e-10 * np.maximum(scale, 1e-300)
        if bad.any():
            raise ValueError(
                f"covariance of component {int(np.flatnonzero(bad)[0])} is not symmetric"
            )
        for j in range(p.n_components):
            try:
                np.linalg.cholesky(V[j])
            except np.linalg.LinAlgError:
                raise ValueError(f"covariance of component {j} is not positive definite") from None
        return p

    # ------------------------------------------------------------------ serialisation
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of a model file or checkpoint (:data:`ARRAY_NAMES`)."""
        out = {
            "weights": np.asarray(self.weights, dtype=np.float64),
            "means": np.asarray(self.means, dtype=np.float64),
            "covariances": np.asarray(self.covariances, dtype=np.float64),
        }
        if self.background is not None:
            out |= {
                "background_weight": np.array(self.background.weight, dtype=np.float64),
                "background_lo": np.asarray(self.background.lo, dtype=np.float64),
                "background_hi": np.asarray(self.background.hi, dtype=np.float64),
            }
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> Params:
        """The inverse of :meth:`to_arrays` (ValueError on a missing array or an incomplete
        background)."""
        missing = [k for k in ("weights", "means", "covariances") if k not in arrays]
        if missing:
            raise ValueError("; ".join(f"no {k} array" for k in missing))
        present = [k in arrays for k in _BACKGROUND]
        if any(present) and not all(present):
            raise ValueError("incomplete background component")
        bg = None
        if all(present):
            bg = Background(
                float(arrays["background_weight"]),
                arrays["background_lo"],
                arrays["background_hi"],
            )
            if bg.weight <= 0.0:
                bg = None
        return cls(
            np.array(arrays["weights"], dtype=np.float64),
            np.array(arrays["means"], dtype=np.float64),
            np.array(arrays["covariances"], dtype=np.float64),
            bg,
        )

    def to_json(self) -> dict[str, Any]:
        """Exact float lists (JSON keeps every bit of a float64)."""
        return {k: v.tolist() for k, v in self.to_arrays().items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Params:
        return cls.from_arrays({k: np.asarray(v, dtype=np.float64) for k, v in d.items()})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Params):
            return NotImplemented
        a, b = self.to_arrays(), other.to_arrays()
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    __hash__ = None  # type: ignore[assignment]  # arrays: not hashable

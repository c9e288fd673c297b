"""XDGMM: a scikit-learn Extreme Deconvolution estimator for in-memory arrays.

The estimator only wires the pieces: the fitting loop of :mod:`xd_dask.optim` (the same loop the
distributed fit runs) with the method of the method table (:mod:`xd_dask.optim.methods`: batch
EM, or online EM / Adam on hash strata of the rows, the waves a catalogue gets on a cluster) on
in-memory statistics (:class:`xd_dask.optim.ArrayStatistics`), started by the same k-means as a
catalogue (:mod:`xd_dask.optim.kmeans`; for projected rows the method of moments,
:mod:`xd_dask.optim.init`). Defaults are the key table's (``fit.*`` in :mod:`xd_dask.config`).

It is a scikit-learn estimator (``clone``, ``get_params`` / ``set_params``, model selection).
Every row has its own noise covariance, so X and X_cov must be split together: :func:`pack`
stacks them into one (n, D + 1, D) array that scikit-learn's splitters index by row, and every
method that takes ``(X, X_cov)`` also takes the packed array alone::

    Z = pack(X, X_cov)
    GridSearchCV(XDGMM(), {"n_components": [2, 4, 8]}, cv=3).fit(Z)  # scored by XDGMM.score
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.utils.validation import check_is_fitted

from xd_dask.config import key
from xd_dask.model import XDModel
from xd_dask.optim import (
    ArrayStatistics,
    ConvergenceWarning,
    FitLoop,
    LoopSettings,
    LoopState,
    Method,
    StepSchedule,
    initial_background,
    method,
)
from xd_dask.optim.background import confine
from xd_dask.optim.init import moment_init
from xd_dask.optim.kmeans import BACKGROUND_TRIM, array_passes, kmeans_start
from xd_dask.optim.methods import STEP_KEYS, InapplicableSettingWarning, inapplicable
from xd_dask.optim.splitmerge import SplitMerge, WaveSplitMerge, array_criteria
from xd_dask.optim.strata import waves_per_epoch
from xd_dask.params import Background, Params

__all__ = [
    "XDGMM",
    "ConvergenceWarning",
    "InapplicableSettingWarning",
    "OverparametrisedWarning",
    "pack",
    "unpack",
]


def _d(name: str) -> Any:
    """The key table's default of ``name``."""
    return key(name).default


_INIT, _SEED, _BACKGROUND = _d("fit.init"), _d("fit.seed"), _d("fit.background")


class OverparametrisedWarning(UserWarning):
    """The mixture has at least as many free parameters as there are rows."""


def pack(X: Any, X_cov: Any) -> np.ndarray:
    """Rows and their noise covariances as one array that row indexing keeps together.

    Parameters
    ----------
    X : (n, D) values, NaN = missing.  X_cov : (n, D, D) noise covariances.

    Returns
    -------
    (n, D + 1, D) array: ``[:, 0, :]`` is X, ``[:, 1:, :]`` is X_cov (:func:`unpack`).
    """
    X = np.asarray(X, dtype=np.float64)
    X_cov = np.asarray(X_cov, dtype=np.float64)
    if X.ndim != 2 or X_cov.shape != (X.shape[0], X.shape[1], X.shape[1]):
        raise ValueError(f"pack needs X (n, D) and X_cov (n, D, D), got {X.shape}, {X_cov.shape}")
    return np.concatenate([X[:, None, :], X_cov], axis=1)


def unpack(Z: Any) -> tuple[np.ndarray, np.ndarray]:
    """(X (n, D), X_cov (n, D, D)) from an array made by :func:`pack`."""
    Z = np.asarray(Z)
    if Z.ndim != 3 or Z.shape[1] != Z.shape[2] + 1:
        raise ValueError(f"a packed array has shape (n, D + 1, D), got {Z.shape}")
    return Z[:, 0, :], Z[:, 1:, :]


def _rows(X: Any, X_cov: Any) -> tuple[np.ndarray, np.ndarray]:
    """(X, X_cov) from the two arrays, or from a packed array (X_cov None)."""
    if X_cov is None:
        Z = np.asarray(X)
        if Z.ndim == 3:
            return unpack(Z)
        raise ValueError(
            "X_cov is required: pass fit(X, X_cov), or one packed array pack(X, X_cov) (shape "
            "(n, D + 1, D); what scikit-learn model selection needs)"
        )
    return np.asarray(X), np.asarray(X_cov)


class XDGMM(DensityMixin, BaseEstimator):
    """Extreme Deconvolution Gaussian mixture (Bovy, Hogg & Roweis 2011) for in-memory data.

    Every default is the key table's (the ``fit.*`` key of the same name; ``xd-dask fit`` on a
    catalogue of the same rows starts and steps the same way).

    Parameters
    ----------
    n_components : int, K.
    method : a method of the method table: "em" (batch EM), "online" (online EM) or "adam"
        (Adam), the last two on ``waves_per_epoch`` hash strata of the rows per epoch.
    max_iter, tol : batch EM's iteration limit and tolerance on the change of the MEAN
        log-likelihood per row, nats (0: exactly ``max_iter`` iterations, no ConvergenceWarning).
    epochs, waves_per_epoch : online EM / Adam: passes over the rows, updates per pass (0: the
        default rule of ``fit.waves_per_epoch``).
    learning_rate : Adam's learning rate.  step : online EM's :class:`~xd_dask.optim.StepSchedule`
        (None: the ``fit.step.*`` defaults).
    reg_covar : regularisation added to every covariance (:mod:`xd_dask.optim.collapse`).
    reg_form : "add" (default) or "bovy_w" (batch EM only).
    init : "kmeans" or an :class:`XDModel` to start from. With projections R, "kmeans" means the
        method of moments (:func:`xd_dask.optim.init.moment_init`: k-means cannot run on
        projected rows), the start :func:`xd_dask.distributed.fit_catalog` gives the same rows.
    random_state : int seed of the initialisation and the waves (None: a fresh one).
    backend : kernel backend (``fit.backend``).
    background : False (default), True (a uniform background component over the box of the
        bulk of the rows, :mod:`xd_dask.optim.background`, starting at ``background_weight``), or
        a :class:`xd_dask.params.Background` (its box and starting weight).
    background_weight : starting weight of the background (``background=True``).
    max_ll_drop : largest accepted decrease of the mean log-likelihood per iteration (nats per
        row); a larger one rolls back and raises :class:`xd_dask.optim.FitDivergedError`.
    split_merge : try split-and-merge moves (:mod:`xd_dask.optim.splitmerge`;
        ``split_merge_candidates`` per convergence); ``max_iter`` then bounds each EM run and
        ``history_`` entries carry ``split_merge`` (the move phase), ``moves_`` the moves tried.

    Settings that the chosen method does not use (``learning_rate`` with "em", say) are named
    in an :class:`InapplicableSettingWarning`.

    Attributes
    ----------
    params_ (:class:`xd_dask.params.Params`), weights_ (K,), means_ (K, D), covariances_
    (K, D, D), background_ (Background or None), converged_, n_iter_, history_ : one entry per
    step ({"iteration" (1-based), "mean_loglike" (at the parameters before that step's update;
    ``wave_mean_loglike`` on waves, whose last entry is the final pass's ``mean_loglike``), "rows",
    "seconds", "reseeded", ...}), lower_bound_ (the mean log-likelihood of the final parameters
    on every row), reseeded_ (list of (iteration, component)), model_ (XDModel).
    """

    def __init__(
        self,
        n_components: int = _d("fit.n_components"),
        *,
        method: str = _d("fit.method"),
        max_iter: int = _d("fit.max_iter"),
        tol: float = _d("fit.tol"),
        epochs: int = _d("fit.epochs"),
        waves_per_epoch: int = _d("fit.waves_per_epoch"),
        learning_rate: float = _d("fit.learning_rate"),
        step: StepSchedule | None = None,
        reg_covar: float = _d("fit.reg_covar"),
        reg_form: str = "add",
        init: str | XDModel = _INIT,
        random_state: Any = _SEED,
        backend: str = _d("fit.backend"),
        background: bool | Background = _BACKGROUND,
        background_weight: float = _d("fit.background_weight"),
        max_ll_drop: float = _d("fit.max_ll_drop"),
        split_merge: bool = _d("fit.split_merge"),
        split_merge_candidates: int = _d("fit.split_merge_candidates"),
    ) -> None:
        self.n_components = n_components
        self.method = method
        self.max_iter = max_iter
        self.tol = tol
        self.epochs = epochs
        self.waves_per_epoch = waves_per_epoch
        self.learning_rate = learning_rate
        self.step = step
        self.reg_covar = reg_covar
        self.reg_form = reg_form
        self.init = init
        self.random_state = random_state
        self.backend = backend
        self.background = background
        self.background_weight = background_weight
        self.max_ll_drop = max_ll_drop
        self.split_merge = split_merge
        self.split_merge_candidates = split_merge_candidates

    # ----------------------------------------------------------------- settings
    #: Estimator parameter -> key of the table (the checks and "does it apply" come from there).
    _KEYS = {
        "n_components": "fit.n_components",
        "max_iter": "fit.max_iter",
        "tol": "fit.tol",
        "epochs": "fit.epochs",
        "waves_per_epoch": "fit.waves_per_epoch",
        "learning_rate": "fit.learning_rate",
        "reg_covar": "fit.reg_covar",
        "backend": "fit.backend",
        "background_weight": "fit.background_weight",
        "max_ll_drop": "fit.max_ll_drop",
        "split_merge_candidates": "fit.split_merge_candidates",
    }

    def _settings(self) -> dict[str, Any]:
        """Dotted key -> value of this estimator's settings (for the method's rule factory)."""
        values = {name: getattr(self, attr) for attr, name in self._KEYS.items()}
        step = self.step if self.step is not None else StepSchedule()
        values |= {name: getattr(step, name.rsplit(".", 1)[1]) for name in STEP_KEYS}
        return values

    def _check_params(self, X: np.ndarray) -> None:
        entry = method(self.method)  # ValueError naming the methods
        K = self.n_components
        if not isinstance(K, int | np.integer) or K < 1:
            raise ValueError(f"n_components must be a positive integer, got {K!r}")
        if K > X.shape[0]:
            raise ValueError(f"n_components={K} is larger than the number of rows ({X.shape[0]})")
        D = X.shape[1]
        p = Params(np.ones(K), np.zeros((K, D)), np.zeros((K, D, D))).n_free
        if p >= X.shape[0]:  # the CLI refuses; in memory (known noise: even N = 1 is defined) warn
            warnings.warn(
                f"n_components={K} in {D} features has {p} free parameters, as many as or more "
                f"than the {X.shape[0]} rows: the mixture can memorise them; use fewer "
                "components or more rows",
                OverparametrisedWarning,
                stacklevel=3,
            )
        for attr, name in self._KEYS.items():
            err = key(name).validate(getattr(self, attr))
            if err:
                raise ValueError(f"{attr} {err}")
        if isinstance(self.init, str) and self.init != "kmeans":
            raise ValueError(f"init must be 'kmeans' or an XDModel, got {self.init!r}")
        if self.reg_form != "add" and not entry.full_batch:
            raise ValueError(f"reg_form={self.reg_form!r} is for batch EM only (method='em')")
        given = [n for a, n in self._KEYS.items() if getattr(self, a) != _d(n)]
        given += list(STEP_KEYS) if self.step is not None else []
        unused = inapplicable(entry.name, given)
        if unused:
            warnings.warn(
                f"method={entry.name!r} ({entry.summary}) does not use "
                + ", ".join(n.removeprefix("fit.") for n in unused),
                InapplicableSettingWarning,
                stacklevel=3,
            )

    def _seed(self) -> int:
        rs = self.random_state
        if isinstance(rs, int | np.integer):
            return int(rs)
        return int(np.random.default_rng(rs).integers(2**31 - 1))

    def _initial(self, X: np.ndarray, X_cov: Any = None, R: Any = None) -> Params:
        bg = self.background
        D = X.shape[1] if R is None else np.shape(R)[2]
        if isinstance(self.init, XDModel):
            start = self._model_start(D)
            if start.background is not None:
                return start
        elif R is not None:
            start = moment_init(X, X_cov, R, self.n_components, self._seed(), self.reg_covar)
        else:
            start, _ = kmeans_start(
                *array_passes(X, self._seed()),
                X.shape[0],
                self.n_components,
                self._seed(),
                reg_covar=self.reg_covar,
                trim=BACKGROUND_TRIM if bg is not False else 0.0,
            )
        if bg is True:
            bg = initial_background(X, self.background_weight)
        return self._add_background(start, bg)

    def _model_start(self, n_features: int) -> Params:
        """The start from an init model (checked against K and D); its background kept only
        when ``background=True``."""
        model = self.init
        if model.n_components != self.n_components or model.n_features != n_features:
            raise ValueError(
                f"init model has K={model.n_components}, D={model.n_features}; "
                f"expected K={self.n_components}, D={n_features}"
            )
        if model.background is not None and self.background is False:
            raise ValueError("the init model has a background component: pass background=True")
        start = model.params.astype(np.float64)
        if model.background is not None and self.background is True:
            return start
        return start.replace(background=None)

    def _add_background(self, start: Params, bg: bool | Background) -> Params:
        """``start`` with the background ``bg`` (False: none); a k-means start's Gaussians are
        confined to its box."""
        if bg is False:
            return start
        if not isinstance(bg, Background):
            raise ValueError(f"background must be True, False or a Background, got {bg!r}")
        m, V = start.means, start.covariances
        if not isinstance(self.init, XDModel):
            m, V, _ = confine(m, V, bg)
        return Params(start.weights * (1.0 - bg.weight), m, V, bg)

    def _schedule(self, entry: Method, n_rows: int, seed: int) -> tuple[LoopSettings, int]:
        """The loop's settings and its planned steps: full batches (max_iter), or epochs of
        hash strata of the rows (waves_per_epoch's rule)."""
        if entry.full_batch:
            settings = LoopSettings(
                max_steps=int(self.max_iter), tol=self.tol, seed=seed, max_ll_drop=self.max_ll_drop
            )
            return settings, int(self.max_iter)
        strata = waves_per_epoch(n_rows, self.n_components, self.waves_per_epoch)
        settings = LoopSettings(
            epochs=int(self.epochs),
            strata=strata,
            seed=seed,
            tol=self.tol,
            max_ll_drop=self.max_ll_drop,
        )
        return settings, int(self.epochs) * strata

    def _fitted(self, state: LoopState, entry: Method) -> None:
        """The fitted attributes from the loop's final state."""
        p = state.params
        self.moves_ = state.info.get("split_merge", {}).get("moves", [])
        self.params_ = p
        self.weights_, self.means_, self.covariances_ = p.weights, p.means, p.covariances
        self.background_ = p.background
        self.converged_ = bool(state.converged)
        self.history_ = state.history
        self.n_iter_ = state.iteration
        self.lower_bound_ = state.history[-1]["mean_loglike"]
        self.reseeded_ = [(r["iteration"], j) for r in state.reseeded for j in r["components"]]
        meta = {
            "method": entry.name,
            "history": state.history,
            "converged": self.converged_,
            "n_iter": self.n_iter_,
            "reseeded": state.reseeded,
            "reg_covar": self.reg_covar,
            "reg_form": self.reg_form,
        }
        self.model_ = XDModel(p, metadata=meta)

    def fit(self, X: Any, X_cov: Any = None, weights: Any = None, R: Any = None) -> XDGMM:
        """Fit by the chosen method.

        Parameters
        ----------
        X : (n, d), NaN marks a missing field; or (n, d + 1, d) from :func:`pack` (X_cov None).
        X_cov : (n, d, d).  weights : (n,) row weights.
        R : (n, d, D) projection matrices, optional (d = D without). With projections the
            default start is the method of moments (k-means cannot run on projected rows); a
            background component is refused (its box would be in the observed space).
        """
        X, X_cov = _rows(X, X_cov)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-d (n_rows, n_features), got shape {X.shape}")
        self._check_params(X)
        if R is not None and self.background is not False:
            raise ValueError(
                "a background component cannot be used with projections R: its box would lie in "
                "the space of the d observed values, the model in the D true features; pass "
                "background=False"
            )
        entry = method(self.method)
        seed = self._seed()
        start = self._initial(X, X_cov, R)
        source = ArrayStatistics(X, X_cov, weights, R, self.backend, seed=seed)
        settings, planned = self._schedule(entry, X.shape[0], seed)
        loop = FitLoop(
            entry.rule(self._settings(), planned),
            source,
            settings,
            log_level=logging.DEBUG,
            moves=self._moves(source, entry.full_batch, settings),
        )
        self._fitted(loop.run(loop.start(start)), entry)
        return self

    def _moves(self, source: ArrayStatistics, full_batch: bool, settings: LoopSettings):
        """Split-and-merge moves (:mod:`xd_dask.optim.splitmerge`), or None."""
        if not self.split_merge:
            return None
        criteria = array_criteria(source)
        if full_batch:
            return SplitMerge(criteria, candidates=int(self.split_merge_candidates), tol=self.tol)
        return WaveSplitMerge(
            criteria,
            every=int(settings.strata),
            candidates=int(self.split_merge_candidates),
            reg_covar=self.reg_covar,
        )

    # ----------------------------------------------------------------- using
    def _model(self) -> XDModel:
        """The fitted model (sklearn's NotFittedError, an AttributeError, before fit)."""
        check_is_fitted(self, "model_", msg="this XDGMM is not fitted yet; call fit(X, X_cov)")
        return self.model_

    def score_samples(self, X: Any, X_cov: Any = None, R: Any = None) -> np.ndarray:
        """(n,) log-likelihood of each noisy row under the fitted mixture (background included;
        R : (n, d, D) projections, optional)."""
        model = self._model()
        X, X_cov = _rows(X, X_cov)
        return np.asarray(model.log_density(X, X_cov, R=R, backend=self.backend))

    def score(self, X: Any, X_cov: Any = None, weights: Any = None, R: Any = None) -> float:
        """Mean log-likelihood per row (weighted by ``weights`` when given); higher is better,
        so it is what model selection maximises."""
        return float(np.average(self.score_samples(X, X_cov, R), weights=weights))

    def predict_proba(self, X: Any, X_cov: Any = None) -> np.ndarray:
        """(n, K) responsibilities (rows sum to 1 - the background's responsibility)."""
        model = self._model()
        X, X_cov = _rows(X, X_cov)
        return np.asarray(model.responsibilities(X, X_cov, backend=self.backend))

    def predict(self, X: Any, X_cov: Any = None) -> np.ndarray:
        """(n,) most probable Gaussian component."""
        return np.argmax(self.predict_proba(X, X_cov), axis=1)

    def posterior(self, X: Any, X_cov: Any = None, R: Any = None):
        """Deconvolved posterior mean (n, D) and covariance (n, D, D) of each row's true value
        (R : (n, d, D) projections, optional)."""
        model = self._model()
        return model.posterior(*_rows(X, X_cov), R=R, backend=self.backend)

    def sample(self, n_samples: int = 1, X_cov: Any = None, random_state: Any = None):
        """Draw (v (n, D), labels (n,)) from the fitted mixture, with noise N(0, S_i) if X_cov."""
        return self._model().sample(n_samples, random_state, X_cov=X_cov, return_labels=True)

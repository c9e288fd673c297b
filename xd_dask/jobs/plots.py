"""Pictures of a fit, written to PNG with matplotlib's Agg backend (no display needed).

- :func:`corner_plot`: the deconvolved model (noise-free samples of the mixture) over chosen
  features, one panel per pair, and the observed catalogue rows (with their noise) drawn on top
  as contours and histograms; the title and legend say which is which;
- :func:`sky_plot` (:mod:`xd_dask.jobs.sky`): the deconvolved model's density on the sky, in RA
  and Dec (radians converted), over the data's footprint or the whole sky (Mollweide);
- :func:`training_curve`: mean log-likelihood per iteration or wave against the step and against
  wall-clock time;
- :func:`density_planes`: the model's exact marginal density in pairs of features (default every
  pair of the first three: (U, V), (U, W), (V, W) for a velocity model fitted to projected data,
  whose catalogue rows are not in the model's space), with each component's 1-sigma ellipse.

Each function writes its file atomically and returns the path. :func:`write_figures` writes the
figures of a fit and names, with the reason, each one it did not draw.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xd_dask.jobs import canvas
from xd_dask.jobs.canvas import marginal_density
from xd_dask.jobs.sky import DEC_NAMES, RA_NAMES, sky_axes, sky_extent, sky_plot
from xd_dask.model import XDModel
from xd_dask.optim.methods import method as fit_method
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = [
    "Figures",
    "corner_plot",
    "default_features",
    "density_planes",
    "marginal_density",
    "sky_extent",
    "sky_plot",
    "training_curve",
    "write_figures",
]


def default_features(model: XDModel, limit: int = 5) -> list[str]:
    """Features for the corner plot: the model's first ``limit`` that are not sky positions
    (the sky map shows those), or all of them when fewer than two others remain."""
    sky = set(RA_NAMES) | set(DEC_NAMES)
    names = [f for f in model.feature_names if f.lower() not in sky]
    return (names if len(names) >= 2 else list(model.feature_names))[:limit]


def _feature_indices(model: XDModel, features: Sequence[str]) -> list[int]:
    idx = []
    for f in features:
        if f not in model.feature_names:
            raise ValueError(f"feature {f!r} is not in the model (features: {model.feature_names})")
        idx.append(model.feature_names.index(f))
    if len(idx) < 2:
        raise ValueError("a corner plot needs at least two features")
    return idx


def _axis_labels(model: XDModel, features: Sequence[str], units: Sequence[str] | None) -> list[str]:
    """``feature [unit]`` for each shown feature (the bare name when the unit is unknown)."""
    if units is None or len(units) != model.n_features:
        return list(features)
    unit = dict(zip(model.feature_names, units, strict=True))
    return [f"{f} [{unit[f]}]" if unit.get(f) else f for f in features]


def _limits(samples: np.ndarray, data: np.ndarray | None) -> np.ndarray:
    """(D, 2) plotting ranges: 0.5 - 99.5 percentiles of the samples (and data), padded."""
    cols = [samples] if data is None or len(data) == 0 else [samples, data]
    lo = np.min([np.nanpercentile(c, 0.5, axis=0) for c in cols], axis=0)
    hi = np.max([np.nanpercentile(c, 99.5, axis=0) for c in cols], axis=0)
    pad = 0.05 * np.maximum(hi - lo, 1e-12)
    return np.stack([lo - pad, hi + pad], axis=1)


#: The corner plot's legend labels: what each layer is.
MODEL_LABEL = "deconvolved model (no noise)"
ROWS_LABEL = "observed rows (with noise)"


def corner_plot(
    model: XDModel,
    path: str | os.PathLike,
    *,
    features: Sequence[str] | None = None,
    data: np.ndarray | None = None,
    n_samples: int = 50_000,
    bins: int = 60,
    random_state: Any = 0,
    dpi: int = 110,
    title: str | None = None,
    units: Sequence[str] | None = None,
    note: str | None = None,
) -> Path:
    """Corner-style plot of the deconvolved model and, when given, the observed rows.

    Parameters
    ----------
    model : the fitted mixture.
    path : output PNG.
    features : names of the features to show (default :func:`default_features`).
    data : (n, D) catalogue rows in the model's feature order (NaN = missing), optional; drawn
        as contours (and histograms) over the model's samples (pairs with a missing field are
        left out per panel). They carry their noise: they are broader than the model.
    n_samples : samples drawn from the model (noise-free).
    units : (D,) unit of each model feature (the schema's), shown on the axes.
    note : a line added to the title (e.g. why no rows are drawn).
    """
    plt = canvas.pyplot()
    features = list(features) if features else default_features(model)
    labels = _axis_labels(model, features, units)
    idx = _feature_indices(model, features)
    samples = model.sample(n_samples, random_state=random_state)[:, idx]  # (n_samples, d)
    shown = None if data is None else np.asarray(data, dtype=np.float64)[:, idx]
    lims = _limits(samples, shown)
    d = len(idx)
    fig, axes = plt.subplots(d, d, figsize=(2.3 * d + 0.6, 2.3 * d + 0.6), squeeze=False)
    for r in range(d):
        for c in range(d):
            ax = axes[r, c]
            if c > r:
                ax.set_visible(False)
                continue
            if r == c:
                _diagonal(ax, samples[:, c], None if shown is None else shown[:, c], lims[c], bins)
            else:
                _pair(ax, samples[:, [c, r]], None if shown is None else shown[:, [c, r]],
                      lims[[c, r]], bins)  # fmt: skip
            ax.set_xlim(lims[c])
            if r == d - 1:
                ax.set_xlabel(labels[c])
            else:
                ax.set_xticklabels([])
            if c == 0 and r > 0:
                ax.set_ylabel(labels[r])
            elif c > 0:
                ax.set_yticklabels([])
    fig.suptitle(title or _corner_title(model, n_samples, shown, note))
    fig.tight_layout()
    # in the empty upper right (a figure legend: the panels keep their size)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper right", fontsize="small",
               bbox_to_anchor=(0.98, 0.88 if d > 1 else 0.98))  # fmt: skip
    return canvas.save(fig, path, dpi)


def _corner_title(model: XDModel, n_samples: int, shown: np.ndarray | None, note: str | None):
    head = f"Deconvolved model (K={model.n_components}; {n_samples:,} noise-free samples, shaded)"
    if shown is not None:
        head += f"\nand {shown.shape[0]:,} observed rows (with their noise; black contours)"
    return head + (f"\n{note}" if note else "")


def _diagonal(ax: Any, samples: np.ndarray, rows: np.ndarray | None, lim: Any, bins: int) -> None:
    """One feature: the model's samples (filled) and the rows (a black line)."""
    edges = np.linspace(*lim, bins + 1)
    ax.hist(samples, bins=edges, density=True, histtype="stepfilled", color="C0", alpha=0.5,
            label=MODEL_LABEL)  # fmt: skip
    if rows is not None:
        col = rows[np.isfinite(rows)]
        ax.hist(col, bins=edges, density=True, histtype="step", color="k", label=ROWS_LABEL)
    ax.set_yticks([])


def _pair(ax: Any, samples: np.ndarray, rows: np.ndarray | None, lims: Any, bins: int) -> None:
    """Two features: the model's samples (shaded, log(1 + count) per cell; empty cells white),
    the rows as black contours."""
    xe = np.linspace(*lims[0], bins + 1)
    ye = np.linspace(*lims[1], bins + 1)
    h, _, _ = np.histogram2d(samples[:, 0], samples[:, 1], bins=(xe, ye))
    # empty cells are left blank (masked), not drawn in the lowest density's colour
    dens = np.ma.masked_equal(np.log1p(h.T), 0.0)
    ax.pcolormesh(xe, ye, dens, cmap=canvas.cmap("Blues"), rasterized=True)
    if rows is not None:
        ok = np.isfinite(rows[:, 0]) & np.isfinite(rows[:, 1])
        if ok.sum() > 10:
            hd, _, _ = np.histogram2d(rows[ok, 0], rows[ok, 1], bins=(xe, ye))
            if hd.max() > 0:
                xc, yc = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
                levels = np.log1p(hd.max()) * np.array([0.2, 0.45, 0.7])
                ax.contour(xc, yc, np.log1p(hd.T), levels=levels, colors="k", linewidths=0.7)
    ax.set_ylim(lims[1])


def training_curve(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    dpi: int = 110,
    title: str | None = None,
    method: str | None = None,
) -> Path:
    """Mean log-likelihood per iteration (full-batch methods) or wave (methods on waves),
    against the step number and against elapsed wall-clock time.

    Parameters
    ----------
    history : events with ``mean_loglike`` and ``seconds`` (time of that step), and
        ``iteration`` (the step index; the position in the list otherwise).
    method : a method of the method table (:mod:`xd_dask.optim.methods`); default: batch EM, or
        online EM when the entries name their partitions or strata (waves do).
    """
    plt = canvas.pyplot()
    if method is None:
        method = "online" if any("wave_mean_loglike" in h for h in history) else "em"
    entry = fit_method(method)
    ll_key = "mean_loglike" if entry.full_batch else "wave_mean_loglike"
    rows = [h for h in history if h.get(ll_key) is not None and not h.get("final")]
    if not rows:
        raise ValueError("no training history to plot")
    ll = np.array([float(h[ll_key]) for h in rows])
    key = entry.step_noun
    if not entry.full_batch:  # waves restart each epoch: number them through the fit
        step = np.arange(1, len(rows) + 1, dtype=float)
    else:
        step = np.array([h.get("iteration", i + 1) for i, h in enumerate(rows)], dtype=float)
    t = np.cumsum([float(h.get("seconds", 0.0) or 0.0) for h in rows])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(step, ll, "o-", ms=3)
    a1.set_xlabel(key + ("" if entry.full_batch else " (through the epochs)"))
    a1.set_ylabel("mean log-likelihood per row")
    a2.plot(t, ll, "o-", ms=3, color="C1")
    a2.set_xlabel("elapsed time [s]")
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
    fig.suptitle(
        title or f"Training curve, {entry.summary} ({len(rows)} {key}s, final {ll[-1]:.4f})"
    )
    fig.tight_layout()
    return canvas.save(fig, path, dpi)


def _ellipses(ax: Any, w: np.ndarray, mu: np.ndarray, cov: np.ndarray, ia: int, ib: int) -> None:
    """The 1-sigma ellipse in features (ia, ib) of every component of weight >= 1 %."""
    from matplotlib.patches import Ellipse  # noqa: PLC0415 - matplotlib only when plotting

    for k in np.flatnonzero(w >= 0.01):
        vals, vecs = np.linalg.eigh(cov[k][np.ix_([ia, ib], [ia, ib])])
        angle = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))
        width, height = 2 * np.sqrt(vals[1]), 2 * np.sqrt(vals[0])
        ax.add_patch(
            Ellipse((mu[k, ia], mu[k, ib]), width, height, angle=angle, fill=False, color="C3",
                    lw=0.5 + 6 * w[k])
        )  # fmt: skip


def _density_label(model: XDModel, a: str, b: str, units: Sequence[str] | None) -> str:
    """The colour bar of a density in features (a, b): per unit of a times unit of b."""
    known = units is not None and len(units) == model.n_features
    unit = dict(zip(model.feature_names, units, strict=True)) if known else {}
    ua, ub = unit.get(a) or "", unit.get(b) or ""
    if not (ua and ub):
        return f"log10 density [per unit of {a} x unit of {b}]"
    per = f"({ua})²" if ua == ub else f"{ua} x {ub}"
    return f"log10 density [per {per}]"


def density_planes(
    model: XDModel,
    path: str | os.PathLike,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    units: Sequence[str] | None = None,
    limits: Mapping[str, tuple[float, float]] | None = None,
    grid: int = 200,
    ellipses: bool = True,
    dpi: int = 110,
    title: str | None = None,
) -> Path:
    """One panel per pair of features: log10 of the model's marginal density (exact, on a grid;
    the deconvolved mixture, not samples), with the 1-sigma ellipse of every component whose
    weight is at least 1 % (line width grows with the weight).

    Parameters
    ----------
    pairs : (x feature, y feature) per panel; default every pair of the first three features.
    units : (D,) unit of each model feature, shown on the axes.
    limits : {feature: (lo, hi)} axis ranges; default the weighted mean +- 3 weighted standard
        deviations of the mixture per feature.
    grid : points per axis of the density grid.
    """
    plt = canvas.pyplot()
    names = list(model.feature_names)
    if pairs is None:
        first = names[:3]
        pairs = [(a, b) for i, a in enumerate(first) for b in first[i + 1 :]]
    if not pairs:
        raise ValueError("density_planes needs a model with at least two features")
    for a, b in pairs:
        _feature_indices(model, [a, b])
    w = np.asarray(model.weights, np.float64)
    mu = np.asarray(model.means, np.float64)
    cov = np.asarray(model.covariances, np.float64)
    mean = w @ mu  # (D,)
    total = np.einsum("k,kij->ij", w, cov) + np.einsum("k,ki,kj->ij", w, mu - mean, mu - mean)
    spread = np.sqrt(np.diag(total))
    lims = {f: (mean[j] - 3 * spread[j], mean[j] + 3 * spread[j]) for j, f in enumerate(names)}
    lims.update(limits or {})
    label = dict(zip(names, _axis_labels(model, names, units), strict=True))
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.4), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        ia, ib = names.index(a), names.index(b)
        xs = np.linspace(*lims[a], grid)
        ys = np.linspace(*lims[b], grid)
        gx, gy = np.meshgrid(xs, ys)
        dens = marginal_density(model, [ia, ib], np.column_stack([gx.ravel(), gy.ravel()]))
        logd = np.log10(np.maximum(dens.reshape(gx.shape), 1e-300))
        top = logd.max()
        mesh = ax.pcolormesh(
            xs, ys, np.ma.masked_less(logd, top - 4), cmap=canvas.cmap("Blues", 0.05)
        )
        mesh.set_rasterized(True)
        ax.contour(xs, ys, logd, levels=top - np.array([3, 2, 1, 0.5]), colors="k", linewidths=0.5)
        if ellipses:
            _ellipses(ax, w, mu, cov, ia, ib)
        ax.set_xlim(lims[a])
        ax.set_ylim(lims[b])
        ax.set_xlabel(label[a])
        ax.set_ylabel(label[b])
        fig.colorbar(
            mesh, ax=ax, fraction=0.046, pad=0.02, label=_density_label(model, a, b, units)
        )
    fig.suptitle(
        title
        or f"Deconvolved model density (K={model.n_components}); red: components' 1-sigma "
        "ellipses (width ~ weight)"
    )
    fig.tight_layout()
    return canvas.save(fig, path, dpi)


class Figures(dict):
    """{name: path} of the figures written, and ``skipped``: {file: why it was not drawn}."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, str] = {}


#: Why the corner plot of a fit to projected rows shows no rows.
PROJECTED_NOTE = "no observed rows drawn: the catalogue observes projections of these features"


def write_figures(
    model: XDModel,
    history: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    cfg: Any,
    data: np.ndarray | None,
    *,
    units: Sequence[str] | None = None,
    projected: bool | None = None,
) -> Figures:
    """The figures of a fit into ``out_dir`` as the job's ``[plots]`` say: the training curve,
    the corner plot, the sky map (a model with RA and Dec features, :mod:`xd_dask.jobs.sky`)
    and, for a model of projected rows, the density planes. Each figure not drawn is named in
    ``skipped`` with the reason.

    data : (n, D) catalogue rows in the model's feature order (None: the model alone).
    units : the unit of each model feature (the schema's): axes, colour bars, RA/Dec in radians.
    projected : the catalogue observes projections of the model's features (a schema
        ``[projection]``): its rows are not drawn over the model. Default: when ``data`` has
        another number of columns than the model has features.
    """
    pc, out, figs = cfg.plots, Path(out_dir), Figures()
    if projected is None:
        projected = data is not None and np.ndim(data) == 2 and data.shape[1] != model.n_features
    note = None
    if projected:
        data, note = None, PROJECTED_NOTE  # observed values are not in the model's space
        figs["planes"] = str(density_planes(model, out / "planes.png", units=units, dpi=pc.dpi))
    if history:
        method = model.metadata.get("method")
        figs["training_curve"] = str(
            training_curve(history, out / "training_curve.png", dpi=pc.dpi, method=method)
        )
    else:
        figs.skipped["training_curve.png"] = "no training history (the model file has none)"
    features = list(pc.features) or default_features(model)
    if len(features) >= 2:
        figs["corner"] = str(
            corner_plot(model, out / "corner.png", features=features, data=data,
                        n_samples=pc.n_samples, random_state=cfg.fit.seed, dpi=pc.dpi,
                        units=units, note=note)
        )  # fmt: skip
    else:
        figs.skipped["corner.png"] = f"it needs two features; the model has {features}"
    _sky(model, out, pc, data, units, figs)
    return figs


def _sky(model: XDModel, out: Path, pc: Any, data: Any, units: Any, figs: Figures) -> None:
    if not pc.sky:
        figs.skipped["sky.png"] = "plots.sky = false"
        return
    try:
        sky_axes(model.feature_names, units)
    except ValueError as exc:
        figs.skipped["sky.png"] = str(exc)
        return
    figs["sky"] = str(sky_plot(model, out / "sky.png", units=units, data=data, dpi=pc.dpi))

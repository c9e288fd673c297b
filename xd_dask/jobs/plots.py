"""Pictures of a fit, written to PNG with matplotlib's Agg backend (no display needed).

- :func:`corner_plot`: the model's density (from samples of the deconvolved mixture) over chosen
  features, one panel per pair, with the catalogue rows drawn on top as contours;
- :func:`sky_plot`: the sky density of model samples in (ra, dec), Mollweide projection
  (Ritchie & Murray 2019, Figure 2);
- :func:`training_curve`: mean log-likelihood per iteration or wave against the step and against
  wall-clock time.

Each function writes its file atomically and returns the path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xd_dask.model import XDModel
from xd_dask.utils import atomic_path, get_logger

log = get_logger(__name__)

__all__ = ["corner_plot", "default_features", "sky_plot", "training_curve"]


def _pyplot():
    import matplotlib  # noqa: PLC0415 - plotting is optional at import time

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    plt = _pyplot()
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    log.info("wrote %s", path)
    return path


def default_features(model: XDModel, limit: int = 5) -> list[str]:
    """Features for the corner plot: the model's first ``limit`` that are not sky positions."""
    names = [f for f in model.feature_names if f not in ("ra", "dec")] or model.feature_names
    return names[:limit]


def _feature_indices(model: XDModel, features: Sequence[str]) -> list[int]:
    idx = []
    for f in features:
        if f not in model.feature_names:
            raise ValueError(f"feature {f!r} is not in the model (features: {model.feature_names})")
        idx.append(model.feature_names.index(f))
    if len(idx) < 2:
        raise ValueError("a corner plot needs at least two features")
    return idx


def _limits(samples: np.ndarray, data: np.ndarray | None) -> np.ndarray:
    """(D, 2) plotting ranges: 0.5 - 99.5 percentiles of the samples (and data), padded."""
    cols = [samples] if data is None or len(data) == 0 else [samples, data]
    lo = np.min([np.nanpercentile(c, 0.5, axis=0) for c in cols], axis=0)
    hi = np.max([np.nanpercentile(c, 99.5, axis=0) for c in cols], axis=0)
    pad = 0.05 * np.maximum(hi - lo, 1e-12)
    return np.stack([lo - pad, hi + pad], axis=1)


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
) -> Path:
    """Corner-style plot of the model's deconvolved density against the data.

    Parameters
    ----------
    model : the fitted mixture.
    path : output PNG.
    features : names of the features to show (default :func:`default_features`).
    data : (n, D) catalogue rows in the model's feature order (NaN = missing), optional; drawn
        as contours over the model density (pairs with a missing field are left out per panel).
    n_samples : samples drawn from the model.
    """
    plt = _pyplot()
    features = list(features) if features else default_features(model)
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
                edges = np.linspace(*lims[c], bins + 1)
                ax.hist(
                    samples[:, c],
                    bins=edges,
                    density=True,
                    histtype="stepfilled",
                    color="C0",
                    alpha=0.5,
                    label="model",
                )
                if shown is not None:
                    col = shown[:, c][np.isfinite(shown[:, c])]
                    ax.hist(col, bins=edges, density=True, histtype="step", color="k", label="data")
                ax.set_yticks([])
            else:
                xe = np.linspace(*lims[c], bins + 1)
                ye = np.linspace(*lims[r], bins + 1)
                h, _, _ = np.histogram2d(samples[:, c], samples[:, r], bins=(xe, ye))
                ax.pcolormesh(xe, ye, np.log1p(h.T), cmap="Blues", rasterized=True)
                if shown is not None:
                    ok = np.isfinite(shown[:, c]) & np.isfinite(shown[:, r])
                    if ok.sum() > 10:
                        hd, _, _ = np.histogram2d(shown[ok, c], shown[ok, r], bins=(xe, ye))
                        if hd.max() > 0:
                            xc, yc = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
                            levels = np.log1p(hd.max()) * np.array([0.2, 0.45, 0.7])
                            ax.contour(
                                xc, yc, np.log1p(hd.T), levels=levels, colors="k", linewidths=0.7
                            )
                ax.set_ylim(lims[r])
            ax.set_xlim(lims[c])
            if r == d - 1:
                ax.set_xlabel(features[c])
            else:
                ax.set_xticklabels([])
            if c == 0 and r > 0:
                ax.set_ylabel(features[r])
            elif c > 0:
                ax.set_yticklabels([])
    axes[0, 0].legend(loc="upper right", fontsize="small", frameon=False)
    fig.suptitle(title or f"XD model (K={model.n_components}) density vs data")
    fig.tight_layout()
    return _save(fig, path, dpi)


def sky_plot(
    model: XDModel,
    path: str | os.PathLike,
    *,
    n_samples: int = 200_000,
    bins: tuple[int, int] = (180, 90),
    random_state: Any = 0,
    dpi: int = 110,
    title: str | None = None,
) -> Path:
    """Sky density of samples from the model in (ra, dec) [deg], Mollweide projection.

    Samples are drawn from the deconvolved mixture; ra is wrapped into [0, 360) and samples
    with |dec| > 90 (a Gaussian's tail beyond the pole) are left out and counted in the title.
    """
    plt = _pyplot()
    names = model.feature_names
    if "ra" not in names or "dec" not in names:
        raise ValueError(f"a sky plot needs features 'ra' and 'dec'; the model has {names}")
    v = model.sample(n_samples, random_state=random_state)
    ra = np.mod(v[:, names.index("ra")], 360.0)
    dec = v[:, names.index("dec")]
    keep = np.abs(dec) <= 90.0
    n_out = int((~keep).sum())
    ra, dec = ra[keep], dec[keep]
    # Mollweide axes take longitude in [-pi, pi]; astronomers draw ra increasing to the left.
    lon = -np.radians(np.where(ra > 180.0, ra - 360.0, ra))
    lat = np.radians(dec)
    xe = np.linspace(-np.pi, np.pi, bins[0] + 1)
    ye = np.linspace(-np.pi / 2, np.pi / 2, bins[1] + 1)
    h, _, _ = np.histogram2d(lon, lat, bins=(xe, ye))
    # density per steradian: divide by the solid angle of each cell
    area = (xe[1] - xe[0]) * (np.sin(ye[1:]) - np.sin(ye[:-1]))  # (ny,)
    dens = h / area[None, :] / max(1, len(ra))
    fig = plt.figure(figsize=(9, 5))
    ax = fig.add_subplot(111, projection="mollweide")
    mesh = ax.pcolormesh(
        xe,
        ye,
        np.log10(dens.T + 1e-3 * dens[dens > 0].min(initial=1.0)),
        cmap="viridis",
        rasterized=True,
    )
    fig.colorbar(
        mesh,
        ax=ax,
        orientation="horizontal",
        pad=0.06,
        fraction=0.05,
        label="log10 density of samples [per sr, normalised]",
    )
    ticks = np.array([150, 120, 90, 60, 30, 0, 330, 300, 270, 240, 210])
    ax.set_xticks(-np.radians(np.where(ticks > 180, ticks - 360, ticks)))
    ax.set_xticklabels([f"{t}°" for t in ticks], fontsize="small")
    ax.grid(True, alpha=0.3)
    extra = f"; {n_out} samples beyond the poles left out" if n_out else ""
    ax.set_title(
        title or f"Sky density of {len(ra)} model samples (K={model.n_components}){extra}", pad=22
    )
    return _save(fig, path, dpi)


def training_curve(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    dpi: int = 110,
    title: str | None = None,
) -> Path:
    """Mean log-likelihood per iteration (batch EM) or wave (online EM), against the step number
    and against elapsed wall-clock time.

    Parameters
    ----------
    history : events with ``mean_loglike`` and ``seconds`` (time of that step), and ``wave`` or
        ``iteration`` (the step index; the position in the list otherwise).
    """
    plt = _pyplot()
    rows = [h for h in history if h.get("mean_loglike") is not None]
    if not rows:
        raise ValueError("no training history to plot")
    ll = np.array([float(h["mean_loglike"]) for h in rows])
    key = "wave" if all("wave" in h for h in rows) else "iteration"
    step = np.array([h.get(key, i) for i, h in enumerate(rows)], dtype=float)
    if key == "wave" and all("epoch" in h for h in rows) and len(set(step)) < len(step):
        step = np.arange(len(rows), dtype=float)  # waves restart each epoch: number them globally
    t = np.cumsum([float(h.get("seconds", 0.0) or 0.0) for h in rows])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(step, ll, "o-", ms=3)
    a1.set_xlabel(key)
    a1.set_ylabel("mean log-likelihood per row")
    a2.plot(t, ll, "o-", ms=3, color="C1")
    a2.set_xlabel("elapsed time [s]")
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
    fig.suptitle(title or f"Training curve ({len(rows)} {key}s, final {ll[-1]:.4f})")
    fig.tight_layout()
    return _save(fig, path, dpi)

"""Pictures of a fit, written to PNG with matplotlib's Agg backend (no display needed).

- :func:`corner_plot`: the model's density (from samples of the deconvolved mixture) over chosen
  features, one panel per pair, with the catalogue rows drawn on top as contours;
- :func:`sky_plot`: the sky density of model samples in (ra, dec) over the data's footprint: a
  zoomed map for a small footprint, the all-sky Mollweide projection (Ritchie & Murray 2019,
  Figure 2) otherwise; empty cells white;
- :func:`training_curve`: mean log-likelihood per iteration or wave against the step and against
  wall-clock time;
- :func:`density_planes`: the model's exact marginal density in pairs of features (default every
  pair of the first three: (U, V), (U, W), (V, W) for a velocity model fitted to projected data,
  whose catalogue rows are not in the model's space), with each component's 1-sigma ellipse.

Each function writes its file atomically and returns the path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xd_dask.model import XDModel
from xd_dask.optim.methods import method as fit_method
from xd_dask.utils import atomic_path, get_logger

log = get_logger(__name__)

__all__ = [
    "corner_plot",
    "default_features",
    "density_planes",
    "marginal_density",
    "sky_extent",
    "sky_plot",
    "training_curve",
]


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


def _axis_labels(model: XDModel, features: Sequence[str], units: Sequence[str] | None) -> list[str]:
    """``feature [unit]`` for each shown feature (the bare name when the unit is unknown)."""
    if units is None or len(units) != model.n_features:
        return list(features)
    unit = dict(zip(model.feature_names, units, strict=True))
    return [f"{f} [{unit[f]}]" if unit.get(f) else f for f in features]


def _cmap(name: str, start: float = 0.2) -> Any:
    """``name`` from ``start`` up (its lowest colour clearly tinted), with masked (empty) cells
    white: no density is never drawn as low density."""
    import matplotlib  # noqa: PLC0415
    from matplotlib.colors import ListedColormap  # noqa: PLC0415

    base = matplotlib.colormaps[name]
    cmap = ListedColormap(base(np.linspace(start, 1.0, 256)), name=f"{name}_from_{start:g}")
    return cmap.with_extremes(bad="white")


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
    units: Sequence[str] | None = None,
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
    units : (D,) unit of each model feature (the schema's), shown on the axes.
    """
    plt = _pyplot()
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
                # empty cells are left blank (masked), not drawn in the lowest density's colour
                dens = np.ma.masked_equal(np.log1p(h.T), 0.0)
                ax.pcolormesh(xe, ye, dens, cmap=_cmap("Blues"), rasterized=True)
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
                ax.set_xlabel(labels[c])
            else:
                ax.set_xticklabels([])
            if c == 0 and r > 0:
                ax.set_ylabel(labels[r])
            elif c > 0:
                ax.set_yticklabels([])
    axes[0, 0].legend(loc="upper right", fontsize="small", frameon=False)
    fig.suptitle(title or f"XD model (K={model.n_components}) density vs data")
    fig.tight_layout()
    return _save(fig, path, dpi)


#: Footprints wider than this (deg of arc in ra x cos(dec), or deg in dec) get the all-sky map.
ALL_SKY_RA, ALL_SKY_DEC = 120.0, 60.0


def sky_extent(
    ra: np.ndarray, dec: np.ndarray, pad: float = 0.08
) -> tuple[float, float, float, float] | None:
    """The (ra_lo, ra_hi, dec_lo, dec_hi) [deg] box around the bulk (0.5 - 99.5 %) of the
    points, padded, with ra_lo < ra_hi possibly outside [0, 360) where the box crosses ra = 0;
    None when the footprint is too wide for a zoomed map (all-sky)."""
    ra = np.mod(np.asarray(ra, np.float64), 360.0)
    dec = np.asarray(dec, np.float64)
    ok = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90.0)
    ra, dec = ra[ok], dec[ok]
    if ra.size < 2:
        return None
    # the centre in ra on the circle, then offsets from it in (-180, 180]
    centre = np.degrees(np.arctan2(np.sin(np.radians(ra)).mean(), np.cos(np.radians(ra)).mean()))
    off = np.mod(ra - centre + 180.0, 360.0) - 180.0
    lo, hi = np.percentile(off, [0.5, 99.5])
    dlo, dhi = np.percentile(dec, [0.5, 99.5])
    cosd = np.cos(np.radians(np.clip(0.5 * (dlo + dhi), -89.0, 89.0)))
    if (hi - lo) * cosd > ALL_SKY_RA or dhi - dlo > ALL_SKY_DEC:
        return None
    size = max((hi - lo) * cosd, dhi - dlo, 1e-3)
    pr, pd = pad * size / cosd, pad * size
    dec_lo, dec_hi = max(-90.0, dlo - pd), min(90.0, dhi + pd)
    return float(centre + lo - pr), float(centre + hi + pr), float(dec_lo), float(dec_hi)


def sky_plot(
    model: XDModel,
    path: str | os.PathLike,
    *,
    n_samples: int = 200_000,
    bins: tuple[int, int] = (180, 90),
    random_state: Any = 0,
    dpi: int = 110,
    title: str | None = None,
    data: np.ndarray | None = None,
) -> Path:
    """Sky density of samples from the model in (ra, dec) [deg].

    The map covers the data's footprint (``data``: catalogue rows in the model's feature order;
    else the bulk of the samples): a zoomed map in (ra, dec) with ra increasing to the left when
    the footprint is small (:func:`sky_extent`), the all-sky Mollweide projection otherwise.
    Cells without samples are white; the colour gives log10 of the density of samples.
    Samples are drawn from the deconvolved mixture; ra is wrapped into [0, 360) and samples
    with |dec| > 90 (a Gaussian's tail beyond the pole) are left out and counted in the title.
    """
    names = model.feature_names
    if "ra" not in names or "dec" not in names:
        raise ValueError(f"a sky plot needs features 'ra' and 'dec'; the model has {names}")
    i_ra, i_dec = names.index("ra"), names.index("dec")
    v = model.sample(n_samples, random_state=random_state)
    ra = np.mod(v[:, i_ra], 360.0)
    dec = v[:, i_dec]
    keep = np.abs(dec) <= 90.0
    n_out = int((~keep).sum())
    ra, dec = ra[keep], dec[keep]
    where = data if data is not None and len(data) else None
    extent = (
        sky_extent(where[:, i_ra], where[:, i_dec]) if where is not None else sky_extent(ra, dec)
    )
    extra = f"; {n_out} samples beyond the poles left out" if n_out else ""
    heading = title or f"Sky density of {len(ra)} model samples (K={model.n_components}){extra}"
    if extent is None:
        return _mollweide(ra, dec, bins, path, dpi, heading)
    return _zoomed(ra, dec, extent, path, dpi, heading)


def _colourbar(fig: Any, ax: Any, mesh: Any, per: str) -> None:
    fig.colorbar(
        mesh,
        ax=ax,
        orientation="horizontal",
        pad=0.1,
        fraction=0.05,
        label=f"log10 density of samples [per {per}, normalised]; white: no samples",
    )


def _mollweide(ra, dec, bins, path, dpi, heading) -> Path:
    plt = _pyplot()
    # Mollweide axes take longitude in [-pi, pi]; astronomers draw ra increasing to the left.
    lon = -np.radians(np.where(ra > 180.0, ra - 360.0, ra))
    lat = np.radians(dec)
    xe = np.linspace(-np.pi, np.pi, bins[0] + 1)
    ye = np.linspace(-np.pi / 2, np.pi / 2, bins[1] + 1)
    h, _, _ = np.histogram2d(lon, lat, bins=(xe, ye))
    # density per steradian: divide by the solid angle of each cell
    area = (xe[1] - xe[0]) * (np.sin(ye[1:]) - np.sin(ye[:-1]))  # (ny,)
    dens = np.ma.masked_equal(h / area[None, :] / max(1, len(ra)), 0.0)
    fig = plt.figure(figsize=(9, 5.4))
    ax = fig.add_subplot(111, projection="mollweide")
    mesh = ax.pcolormesh(xe, ye, np.ma.log10(dens.T), cmap=_cmap("viridis", 0.0), rasterized=True)
    _colourbar(fig, ax, mesh, "sr")
    ticks = np.array([150, 120, 90, 60, 30, 0, 330, 300, 270, 240, 210])
    ax.set_xticks(-np.radians(np.where(ticks > 180, ticks - 360, ticks)))
    ax.set_xticklabels([f"{t}°" for t in ticks], fontsize="small")
    ax.grid(True, alpha=0.3)
    ax.set_title(heading, pad=22)
    return _save(fig, path, dpi)


def _zoomed(ra, dec, extent, path, dpi, heading) -> Path:
    """The footprint in (ra, dec), ra increasing to the left, equal angles on both axes."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415

    ra_lo, ra_hi, dec_lo, dec_hi = extent
    centre = 0.5 * (ra_lo + ra_hi)
    x = centre + np.mod(ra - centre + 180.0, 360.0) - 180.0  # unwrapped next to the box
    cosd = np.cos(np.radians(np.clip(0.5 * (dec_lo + dec_hi), -89.0, 89.0)))
    ny = 80
    nx = int(np.clip(round(ny * (ra_hi - ra_lo) * cosd / max(dec_hi - dec_lo, 1e-9)), 20, 240))
    xe = np.linspace(ra_lo, ra_hi, nx + 1)
    ye = np.linspace(dec_lo, dec_hi, ny + 1)
    h, _, _ = np.histogram2d(x, dec, bins=(xe, ye))
    # density per square degree: cell area (dx cos dec) x dy
    area = (xe[1] - xe[0]) * np.degrees(np.sin(np.radians(ye[1:])) - np.sin(np.radians(ye[:-1])))
    dens = np.ma.masked_equal(h / area[None, :] / max(1, len(ra)), 0.0)
    fig, ax = plt.subplots(figsize=(8, 7))
    mesh = ax.pcolormesh(xe, ye, np.ma.log10(dens.T), cmap=_cmap("viridis", 0.0), rasterized=True)
    ax.set_xlim(ra_hi, ra_lo)  # ra increases to the left
    ax.set_ylim(dec_lo, dec_hi)
    ax.set_aspect(1.0 / cosd)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{np.mod(v, 360.0):.6g}°"))
    ax.set_xlabel("ra [deg]")
    ax.set_ylabel("dec [deg]")
    ax.grid(True, alpha=0.3)
    _colourbar(fig, ax, mesh, "deg²")
    ax.set_title(
        heading + f"\nfootprint ra {np.mod(ra_lo, 360):.4g}..{np.mod(ra_hi, 360):.4g}°, "
        f"dec {dec_lo:.4g}..{dec_hi:.4g}°",
        fontsize="medium",
    )
    return _save(fig, path, dpi)


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
    plt = _pyplot()
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
    return _save(fig, path, dpi)


def marginal_density(model: XDModel, idx: Sequence[int], grid: np.ndarray) -> np.ndarray:
    """The mixture's exact marginal density over the features ``idx`` at the points ``grid``.

    Parameters
    ----------
    model : the mixture (weights (K,), means (K, D), covariances (K, D, D)).
    idx : (p,) feature indices.
    grid : (m, p) points.

    Returns
    -------
    (m,) density: sum_k w_k N(grid; mu_k[idx], V_k[idx, idx]).
    """
    idx = list(idx)
    pts = np.asarray(grid, np.float64)
    out = np.zeros(pts.shape[0])
    for w, mu, V in zip(model.weights, model.means, model.covariances, strict=True):
        sub = np.asarray(V, np.float64)[np.ix_(idx, idx)]  # (p, p)
        L = np.linalg.cholesky(sub)
        z = np.linalg.solve(L, (pts - np.asarray(mu, np.float64)[idx]).T)  # (p, m)
        logdet = 2.0 * np.log(np.diag(L)).sum()
        out += w * np.exp(-0.5 * (z * z).sum(0) - 0.5 * (logdet + len(idx) * np.log(2 * np.pi)))
    return out


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
    plt = _pyplot()
    from matplotlib.patches import Ellipse  # noqa: PLC0415

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
            xs, ys, np.ma.masked_less(logd, top - 4), cmap=_cmap("Blues", 0.05), rasterized=True
        )
        ax.contour(xs, ys, logd, levels=top - np.array([3, 2, 1, 0.5]), colors="k", linewidths=0.5)
        if ellipses:
            for k in np.flatnonzero(w >= 0.01):
                sub = cov[k][np.ix_([ia, ib], [ia, ib])]
                vals, vecs = np.linalg.eigh(sub)
                angle = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))
                ax.add_patch(
                    Ellipse(
                        (mu[k, ia], mu[k, ib]),
                        2 * np.sqrt(vals[1]),
                        2 * np.sqrt(vals[0]),
                        angle=angle,
                        fill=False,
                        color="C3",
                        lw=0.5 + 6 * w[k],
                    )
                )
        ax.set_xlim(lims[a])
        ax.set_ylim(lims[b])
        ax.set_xlabel(label[a])
        ax.set_ylabel(label[b])
        fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.02, label="log10 density")
    fig.suptitle(
        title
        or f"Deconvolved model density (K={model.n_components}); red: components' 1-sigma "
        "ellipses (width ~ weight)"
    )
    fig.tight_layout()
    return _save(fig, path, dpi)

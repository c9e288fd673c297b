"""The deconvolved model's density on the sky (``sky.png``).

:func:`sky_axes` finds a model's right ascension and declination among its features by name
(``ra``/``dec``, ``RA_ICRS``/``DE_ICRS``, ``RArad``/``DErad``, ``RAJ2000``/``DEJ2000``, ...) and
their unit (the schema's; without one, ``...rad`` names are radians and others degrees); any angle
unit astropy knows is converted to degrees, and the title says so.

:func:`sky_plot` draws the mixture's exact marginal density in (RA, Dec) -- evaluated on a grid,
not samples, so narrow components are not a few scattered cells -- as a density per unit solid
angle (the density in (RA, Dec) divided by cos Dec), wrapped in RA (a component near RA = 0 shows
on both sides): over the data's footprint in degrees with RA increasing to the left when it is
small (:func:`sky_extent`), else as the all-sky Mollweide map, both labelled RA and Dec. Cells
where the density is below 1e-5 of its peak are white.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xd_dask.jobs import canvas

__all__ = [
    "ALL_SKY_DEC",
    "ALL_SKY_RA",
    "SkyAxes",
    "sky_axes",
    "sky_density",
    "sky_extent",
    "sky_plot",
]

#: Footprints wider than this (deg of arc in ra x cos(dec), or deg in dec) get the all-sky map.
ALL_SKY_RA, ALL_SKY_DEC = 120.0, 60.0
#: Feature names (lower case) taken for right ascension and declination.
RA_NAMES = ("ra", "ra_icrs", "raj2000", "radeg", "rarad", "ra_deg", "ra_rad", "alpha")
DEC_NAMES = ("dec", "de", "de_icrs", "dej2000", "dedeg", "derad", "dec_deg", "dec_rad", "delta")
#: Decades of density shown below the peak.
DECADES = 5.0


@dataclass(frozen=True)
class SkyAxes:
    """Where RA and Dec are among a model's features, and the factors to degrees."""

    ra: str
    dec: str
    i_ra: int
    i_dec: int
    ra_to_deg: float
    dec_to_deg: float
    units: tuple[str, str]

    @property
    def note(self) -> str:
        """How the positions were converted ('' for degrees)."""
        if self.ra_to_deg == 1.0 and self.dec_to_deg == 1.0:
            return ""
        return f"{self.ra}, {self.dec} in {self.units[0] or 'rad'} converted to degrees"


def _to_deg(name: str, unit: str) -> float:
    """Degrees per unit of feature ``name`` (ValueError when ``unit`` is not an angle)."""
    if not unit:
        return 180.0 / math.pi if name.lower().endswith("rad") else 1.0
    from astropy import units as u  # noqa: PLC0415

    try:
        return float(u.Unit(unit).to(u.deg))
    except (ValueError, TypeError, u.UnitsError):
        raise ValueError(f"{name} has the unit {unit!r}, not an angle") from None


def sky_axes(names: Sequence[str], units: Sequence[str] | None = None) -> SkyAxes:
    """The RA and Dec features of ``names`` (module docstring); ValueError saying why not."""
    lower = [n.lower() for n in names]
    ra = next((names[i] for i, n in enumerate(lower) if n in RA_NAMES), None)
    dec = next((names[i] for i, n in enumerate(lower) if n in DEC_NAMES), None)
    if ra is None or dec is None:
        raise ValueError(
            f"no RA and Dec features (names such as ra/dec, RA_ICRS/DE_ICRS, RArad/DErad) among "
            f"the model's {list(names)}"
        )
    i_ra, i_dec = list(names).index(ra), list(names).index(dec)
    unit = list(units) if units is not None and len(units) == len(names) else [""] * len(names)
    return SkyAxes(
        ra,
        dec,
        i_ra,
        i_dec,
        _to_deg(ra, unit[i_ra]),
        _to_deg(dec, unit[i_dec]),
        (unit[i_ra], unit[i_dec]),
    )


def sky_density(model: Any, axes: SkyAxes, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """(m,) the model's density per square degree of sky at (ra, dec) [deg], wrapped in RA."""
    ra = np.asarray(ra, np.float64)
    dec = np.asarray(dec, np.float64)
    total = np.zeros(ra.shape[0])
    for shift in (-360.0, 0.0, 360.0):
        pts = np.column_stack([(ra + shift) / axes.ra_to_deg, dec / axes.dec_to_deg])
        total += canvas.marginal_density(model, [axes.i_ra, axes.i_dec], pts)
    per_deg2 = total / (axes.ra_to_deg * axes.dec_to_deg)  # in (ra, dec) coordinates
    return per_deg2 / np.maximum(np.cos(np.radians(dec)), 1e-12)


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


def _footprint(model: Any, axes: SkyAxes, data: np.ndarray | None) -> np.ndarray:
    """(n, 2) positions [deg] that set the map's extent: the data's, else model samples'."""
    if data is not None and len(data):
        pts = np.asarray(data, np.float64)[:, [axes.i_ra, axes.i_dec]]
    else:
        pts = model.sample(20_000, random_state=0)[:, [axes.i_ra, axes.i_dec]]
    return pts * np.array([axes.ra_to_deg, axes.dec_to_deg])


def sky_plot(
    model: Any,
    path: str | os.PathLike,
    *,
    units: Sequence[str] | None = None,
    data: np.ndarray | None = None,
    dpi: int = 110,
    title: str | None = None,
) -> Path:
    """The model's density on the sky (module docstring), written atomically to ``path``.

    units : (D,) the unit of each model feature (the schema's): RA and Dec are converted to
        degrees from them.
    data : (n, D) catalogue rows in the model's feature order: their footprint sets the map.
    """
    axes = sky_axes(model.feature_names, units)
    pts = _footprint(model, axes, data)
    extent = sky_extent(pts[:, 0], pts[:, 1])
    heading = title or f"Deconvolved model (K={model.n_components}): density on the sky"
    if axes.note:
        heading += f"\n({axes.note})"
    if extent is None:
        return _mollweide(model, axes, path, dpi, heading)
    return _zoomed(model, axes, extent, path, dpi, heading)


def _masked_log(dens: np.ndarray) -> np.ndarray:
    """log10 of the density, cells more than :data:`DECADES` below the peak masked."""
    logd = np.log10(np.maximum(dens, 1e-300))
    return np.ma.masked_less(logd, logd.max() - DECADES)


def _colourbar(fig: Any, ax: Any, mesh: Any, per: str) -> None:
    fig.colorbar(
        mesh,
        ax=ax,
        orientation="horizontal",
        pad=0.1,
        fraction=0.05,
        label=f"log10 model density [fraction of stars per {per}]; white: < 1e-5 of the peak",
    )


def _mollweide(model: Any, axes: SkyAxes, path: Any, dpi: int, heading: str) -> Path:
    plt = canvas.pyplot()
    # Mollweide axes take longitude in [-pi, pi]; astronomers draw ra increasing to the left.
    xe = np.linspace(-np.pi, np.pi, 361)
    ye = np.linspace(-np.pi / 2, np.pi / 2, 181)
    lon, lat = np.meshgrid(0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1]))  # (180, 360)
    ra = np.mod(-np.degrees(lon), 360.0)
    per_deg2 = sky_density(model, axes, ra.ravel(), np.degrees(lat).ravel())
    per_sr = per_deg2.reshape(lon.shape) * (180.0 / np.pi) ** 2
    fig = plt.figure(figsize=(9, 5.6))
    ax = fig.add_subplot(111, projection="mollweide")
    mesh = ax.pcolormesh(xe, ye, _masked_log(per_sr), cmap=canvas.cmap("viridis", 0.0))
    mesh.set_rasterized(True)
    _colourbar(fig, ax, mesh, "sr")
    ticks = np.array([150, 120, 90, 60, 30, 0, 330, 300, 270, 240, 210])
    ax.set_xticks(-np.radians(np.where(ticks > 180, ticks - 360, ticks)))
    ax.set_xticklabels([f"{t}°" for t in ticks], fontsize="small")
    ax.set_xlabel("RA [deg] (increasing to the left)")
    ax.set_ylabel("Dec [deg]")
    ax.grid(True, alpha=0.3)
    ax.set_title(heading, pad=22)
    return canvas.save(fig, path, dpi)


def _zoomed(model: Any, axes: SkyAxes, extent: tuple, path: Any, dpi: int, heading: str) -> Path:
    """The footprint in (ra, dec), ra increasing to the left, equal angles on both axes."""
    plt = canvas.pyplot()
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415

    ra_lo, ra_hi, dec_lo, dec_hi = extent
    cosd = np.cos(np.radians(np.clip(0.5 * (dec_lo + dec_hi), -89.0, 89.0)))
    ny = 120
    nx = int(np.clip(round(ny * (ra_hi - ra_lo) * cosd / max(dec_hi - dec_lo, 1e-9)), 30, 360))
    xe = np.linspace(ra_lo, ra_hi, nx + 1)
    ye = np.linspace(dec_lo, dec_hi, ny + 1)
    gx, gy = np.meshgrid(0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1]))  # (ny, nx)
    dens = sky_density(model, axes, np.mod(gx.ravel(), 360.0), gy.ravel()).reshape(gx.shape)
    fig, ax = plt.subplots(figsize=(8, 7))
    mesh = ax.pcolormesh(xe, ye, _masked_log(dens), cmap=canvas.cmap("viridis", 0.0))
    mesh.set_rasterized(True)
    ax.set_xlim(ra_hi, ra_lo)  # ra increases to the left
    ax.set_ylim(dec_lo, dec_hi)
    ax.set_aspect(1.0 / cosd)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{np.mod(v, 360.0):.6g}°"))
    ax.set_xlabel("RA [deg]")
    ax.set_ylabel("Dec [deg]")
    ax.grid(True, alpha=0.3)
    _colourbar(fig, ax, mesh, "deg²")
    ax.set_title(
        heading + f"\nfootprint RA {np.mod(ra_lo, 360):.4g}..{np.mod(ra_hi, 360):.4g}°, "
        f"Dec {dec_lo:.4g}..{dec_hi:.4g}°",
        fontsize="medium",
    )
    return canvas.save(fig, path, dpi)

"""What every figure of :mod:`xd_dask.jobs.plots` and :mod:`xd_dask.jobs.sky` shares: matplotlib
with the Agg backend (no display needed), an atomic PNG writer, colour maps whose empty (masked)
cells are white, so that no density is never drawn as a low one, and a mixture's exact marginal
density on a grid (what the density maps draw: the deconvolved model, not samples of it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from xd_dask.outputs import atomic_path
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["cmap", "marginal_density", "pyplot", "save"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib  # noqa: PLC0415 - plotting is optional at import time

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after the backend is chosen

    return plt


def save(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    """Write ``fig`` to ``path`` (PNG) atomically and close it."""
    plt = pyplot()
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    log.info("wrote %s", path)
    return path


def cmap(name: str, start: float = 0.2) -> Any:
    """``name`` from ``start`` up (its lowest colour clearly tinted), masked cells white."""
    import matplotlib  # noqa: PLC0415 - plotting is optional at import time
    from matplotlib.colors import ListedColormap  # noqa: PLC0415 - as above

    base = matplotlib.colormaps[name]
    out = ListedColormap(base(np.linspace(start, 1.0, 256)), name=f"{name}_from_{start:g}")
    return out.with_extremes(bad="white")


def marginal_density(model: Any, idx: Any, grid: np.ndarray) -> np.ndarray:
    """The mixture's exact marginal density over the features ``idx`` at the points ``grid``.

    Parameters
    ----------
    model : the mixture (weights (K,), means (K, D), covariances (K, D, D)).
    idx : (p,) feature indices.
    grid : (m, p) points.

    Returns
    -------
    (m,) density: sum_k w_k N(grid; mu_k[idx], V_k[idx, idx]) (a background component, if
    any, is not included: it has no density outside its box and is flat inside).
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

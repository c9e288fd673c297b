"""Robust EM: what an update must pass before it is accepted, and when a fit has diverged.

Acceptance (every update, re-seeding included, and the initial parameters): weights finite and
positive, summing to 1 - background weight; means finite; every covariance finite, symmetric and
safely positive definite (:func:`xd_dask.optim.collapse.is_pd`). A failure raises
:class:`FitDivergedError` naming the component; nothing is accepted or checkpointed.

Drop rule (full-batch steps of monotone rules, i.e. batch EM). Exact EM never lowers the mean
log-likelihood L. Two things in an update may, a little: re-seeding a collapsed component (the
split of the heaviest component changes the density of its rows; measured drops are listed in
tests/test_robust_em.py: at most 1.1e-3 nats per row over 35 random fits) and regularisation
(reg_covar added to V; ~reg_covar x tr(T^-1) per row, large only when reg_covar is not small
against the covariances). So:

- a decrease of at most ``max_ll_drop`` nats per row (``fit.max_ll_drop``) is accepted and logged
  (a warning naming the re-seeded components, or rounding / regularisation);
- a larger decrease is CATASTROPHIC: an update made some rows (typically one absurd row whose own
  component was re-seeded, or that dragged a component) vastly less likely. The loop rolls back to
  the parameters before that update, checkpoints them, and raises :class:`FitDivergedError` naming
  the re-seeded components, the rows whose log-likelihood fell most (file, row, source id, before
  and after) and their component before the update, and the remedies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from xd_dask.optim.collapse import is_pd
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["FitDivergedError", "check_bulk", "check_params", "is_catastrophic"]


class FitDivergedError(FloatingPointError):
    """A fit produced parameters that cannot be accepted (non-finite, not positive definite) or
    a catastrophic drop of the log-likelihood.

    rows : the rows named (dicts with row, ll_before, ll_after, component, and file, id and
        id_column where known); components : the components involved.
    """

    def __init__(self, message: str, rows: list[dict] | None = None, components=()) -> None:
        super().__init__(message)
        self.rows = list(rows or [])
        self.components = sorted({int(c) for c in components})


def check_params(params: Any, where: str) -> None:
    """Raise :class:`FitDivergedError` unless ``params`` (:class:`xd_dask.params.Params`) may
    be accepted."""
    w = np.asarray(params.weights, dtype=np.float64)
    m = np.asarray(params.means, dtype=np.float64)
    V = np.asarray(params.covariances, dtype=np.float64)
    total = 1.0 - params.background_weight
    problems = []
    for j in range(w.shape[0]):
        if not (math.isfinite(w[j]) and w[j] > 0):
            problems.append((j, f"weight {w[j]!r}"))
        elif not np.all(np.isfinite(m[j])):
            problems.append((j, "mean not finite"))
    ok = is_pd(V)
    for j in np.flatnonzero(~ok):
        ev = np.linalg.eigvalsh(V[j]) if np.all(np.isfinite(V[j])) else [float("nan")]
        problems.append((int(j), f"covariance not positive definite (eigenvalues {ev[0]:.3g}.."))
    if not problems and abs(w.sum() - total) > 1e-8:
        problems.append((-1, f"weights sum to {w.sum():.12g}, not {total:.12g}"))
    if problems:
        text = "; ".join(f"component {j}: {p}" if j >= 0 else p for j, p in problems)
        raise FitDivergedError(
            f"{where} cannot be accepted ({text}); nothing was accepted or checkpointed",
            components=[j for j, _ in problems if j >= 0],
        )


def is_catastrophic(before: float, after: float, max_drop: float) -> bool:
    """True when the mean log-likelihood fell by more than ``max_drop`` nats per row."""
    return before - after > max_drop


def note_decrease(before: float, after: float, reseeded: list[int], iteration: int) -> None:
    """Log an accepted (small) decrease and what explains it."""
    if after >= before - 1e-12 * max(1.0, abs(before)):
        return
    if reseeded:
        log.warning(
            "iteration %d: mean log-likelihood fell by %.3g after re-seeding components %s "
            "(accepted: below max_ll_drop)",
            iteration,
            before - after,
            reseeded,
        )
    else:
        log.info(
            "iteration %d: mean log-likelihood fell by %.3g (regularisation or rounding)",
            iteration,
            before - after,
        )


def describe_row(r: dict) -> str:
    where = f"{r['file']} row {r['row']}" if r.get("file") else f"row {r['row']}"
    if r.get("id") is not None:
        where += f" ({r.get('id_column') or 'id'} {r['id']})"
    if r.get("ll_after") is None:
        return f"{where}: log-likelihood {r['ll_before']:.6g} (component {r['component']})"
    return (
        f"{where}: log-likelihood {r['ll_before']:.6g} -> {r['ll_after']:.6g}"
        f" (component {r['component']} before)"
    )


REMEDY = (
    "An absurd row (a value far outside the data, e.g. a parallax of 1e30 mas) gets or drags "
    "a component of its own. Fix or drop such rows (schema min/max with on_bad = 'drop'), or "
    "let a uniform background component absorb them (fit.background = true; "
    "XDGMM(background=True)). (A reg_covar that is not small against the covariances can "
    "also lower the log-likelihood; then lower reg_covar or raise max_ll_drop.)"
)


def nonfinite_error(rule: str, iteration: int, ll: float, rows: list[dict]):
    """The error for a non-finite mean log-likelihood at accepted parameters: some row
    overflows the working precision (float32 rows far outside the data)."""
    lines = [
        f"{rule}: mean log-likelihood is {ll} at iteration {iteration}; the parameters passed "
        "every check, so a row overflows the working precision (dtype)"
    ]
    if rows:
        lines.append("rows with the lowest (or non-finite) log-likelihood:")
        lines += ["  " + describe_row(r) for r in rows]
    lines.append(REMEDY)
    return FitDivergedError("\n".join(lines), rows, {int(r["component"]) for r in rows})


def update_failed_error(rule: str, iteration: int, exc: Exception, rows: list[dict]):
    """The error for an update that failed or could not be accepted; ``rows`` are the rows with
    the lowest log-likelihood at the parameters the update started from."""
    lines = [f"{rule}: the update of iteration {iteration} failed: {exc}"]
    if rows:
        lines.append("rows with the lowest log-likelihood at the parameters before it:")
        lines += ["  " + describe_row(r) for r in rows]
    lines.append(REMEDY)
    comps = set(getattr(exc, "components", [])) | {int(r["component"]) for r in rows}
    return FitDivergedError("\n".join(lines), rows, comps)


def diverged_error(
    rule: str,
    last: dict,
    before: float,
    after: float,
    max_drop: float,
    rows: list[dict],
    rolled_back: bool,
) -> FitDivergedError:
    """The error for a catastrophic drop after the update recorded in history entry ``last``."""
    reseeded = [int(j) for j in last.get("reseeded", [])]
    components = set(reseeded) | {int(r["component"]) for r in rows}
    lines = [
        f"{rule}: the mean log-likelihood per row fell from {before:.8g} to {after:.8g} "
        f"(by {before - after:.3g} > max_ll_drop = {max_drop:g}) after the update of iteration "
        f"{last['iteration']}" + (f", which re-seeded components {reseeded}" if reseeded else ""),
        (
            "rolled back to the parameters before that update (the checkpoint, if any, holds them)"
            if rolled_back
            else "no earlier parameters to roll back to (fit resumed right after that update)"
        ),
        f"components involved: {sorted(components)}",
    ]
    if rows:
        lines.append("rows whose log-likelihood fell most:")
        lines += ["  " + describe_row(r) for r in rows]
    lines.append(REMEDY)
    return FitDivergedError("\n".join(lines), rows, components)


# ----------------------------------------------------------------------------- the bulk
#: A fit is refused when leaving out its few least likely rows (:data:`BULK_ROWS`) raises its
#: mean log-likelihood per row by more than this (nats; a difference of log-densities, so it
#: does not depend on the features' units): the "mean log-likelihood" then describes them.
DOMINANT_SHIFT = 1.0
#: ... rows named (and the least number of rows for the check to mean anything: 20 x this).
BULK_ROWS = 5
#: A component is "far outside the others" when its mean is more than this many standard
#: deviations of the rest of the mixture (per feature) from the rest's mean ...
FAR_SIGMAS = 30.0
#: ... while it holds less than this share of the rows.
FEW_ROWS_SHARE = 0.01


def _far_components(params: Any, n_rows: int) -> list[tuple[int, float]]:
    """(component, distance in standard deviations of the others) of the components that hold
    a small share of the rows and sit far outside the rest of the mixture."""
    w = np.asarray(params.weights, dtype=np.float64)
    m = np.asarray(params.means, dtype=np.float64)
    V = np.asarray(params.covariances, dtype=np.float64)
    out = []
    for j in range(w.shape[0]):
        if w.shape[0] < 2 or w[j] * n_rows >= max(FEW_ROWS_SHARE * n_rows, 1.0) or w[j] > 0.5:
            continue
        others = np.arange(w.shape[0]) != j
        wo = w[others] / w[others].sum()
        mean = wo @ m[others]
        var = np.einsum("k,kd->d", wo, np.diagonal(V[others], axis1=1, axis2=2)) + np.einsum(
            "k,kd->d", wo, (m[others] - mean) ** 2
        )
        z = float(np.max(np.abs(m[j] - mean) / np.sqrt(np.maximum(var, 1e-300))))
        if z > FAR_SIGMAS:
            out.append((j, z))
    return out


def check_bulk(rule: str, params: Any, mean_ll: float, n_rows: int, source: Any) -> None:
    """Refuse to call a fit converged when it describes a handful of rows, not the bulk:

    - its mean log-likelihood is dominated by its :data:`BULK_ROWS` least likely rows (without
      them it is higher by more than :data:`DOMINANT_SHIFT` nats per row: one row at 1e30 gives
      a mean of -1.6e56);
    - a component holds under :data:`FEW_ROWS_SHARE` of the rows and sits more than
      :data:`FAR_SIGMAS` standard deviations of the other components away (ten rows at
      (1e6, -1e6) take a component of their own and a real one is lost).

    A background component (``params.background``) is what such rows are for: then only the
    first check applies. Raises :class:`FitDivergedError` naming the rows (one diagnosis pass of
    ``source``); a fit of fewer than 20 x BULK_ROWS rows is not checked.
    """
    if n_rows < 20 * BULK_ROWS or not math.isfinite(mean_ll):
        return
    total = mean_ll * n_rows
    worst = source.worst_rows(params, None, BULK_ROWS)
    low = sum(float(r["ll_before"]) for r in worst)
    rest = (total - low) / (n_rows - len(worst))
    if not math.isfinite(low) or rest - mean_ll > DOMINANT_SHIFT:
        lines = [
            f"{rule}: the fit's mean log-likelihood {mean_ll:.6g} is dominated by {len(worst)} of "
            f"its {n_rows} rows (without them: {rest:.6g}): it does not describe the bulk",
            "the least likely rows:",
            *("  " + describe_row(r) for r in worst),
            REMEDY,
        ]
        raise FitDivergedError("\n".join(lines), worst, {int(r["component"]) for r in worst})
    if params.background is not None:
        return
    for j, z in _far_components(params, n_rows):
        rows = source.rows_of(params, j, BULK_ROWS)
        lines = [
            f"{rule}: component {j} holds {params.weights[j] * n_rows:.3g} of {n_rows} rows and "
            f"sits {z:.3g} standard deviations of the other components away (mean "
            f"{np.array2string(np.asarray(params.means[j]), precision=4)}): it describes a "
            "handful of rows far outside the others, not the bulk",
            "the rows it holds most:",
            *("  " + describe_row(r) for r in rows),
            REMEDY,
        ]
        raise FitDivergedError("\n".join(lines), rows, {j})

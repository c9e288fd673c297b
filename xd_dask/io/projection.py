"""Projections: a schema whose rows observe d derived values of D true features, x = R v + noise.

Contract (the reader, the distributed engine and the kernels rely on it)
-----------------------------------------------------------------------
A schema with a ``[projection]`` table describes row i by d OBSERVED values x_i with noise
covariance S_i and a projection R_i that maps the D TRUE features v_i (the space of the mixture)
to the observed values:

    x_i = R_i v_i + e_i,    e_i ~ N(0, S_i),    v_i ~ sum_k alpha_k N(m_k, V_k).

- ``CatalogSchema.features`` (D names, ``units`` beside them) are the TRUE features: the mixture's
  means m_k are D-vectors in this order, ``XDModel.feature_names`` equals them, and a posterior
  is a posterior of v_i. ``CatalogSchema.observed`` (d names) name the columns of X.
- ``read_partition`` / ``build_covariance`` return X (n, d), X_cov (n, d, d) and R (n, d, D), all
  of the dtype asked for (float32 or float64; the arithmetic is float64 either way), C-contiguous,
  rows dropped together. Every valid row is complete (no NaN in X): a row whose inputs are null
  is bad (reason ``missing_input``), never a row with missing fields.
- Without a projection nothing changes: R is None, ``observed == features`` and d = D.

Kind ``tangential_velocity`` (d = 2, D = 3; Bovy, Hogg & Roweis 2009): from ICRS position
(alpha, delta), parallax varpi [mas] and proper motions (mu_alpha* = mu_alpha cos delta, mu_delta)
[mas/yr],

    x = K (mu_alpha*, mu_delta) / varpi   [km/s],  K = 4.740470446 km/s per (mas/yr / mas),
    S = J C J^T,  J = d x / d(varpi, mu_alpha*, mu_delta) (2 x 3), C the 3 x 3 covariance of
                  (varpi, mu_alpha*, mu_delta) from their errors and correlations,
    R = [p; q] A   (2 x 3): p = (-sin a, cos a, 0), q = (-sin d cos a, -sin d sin a, cos d) are
                  the normal-triad directions of increasing alpha and delta in ICRS, A the
                  ICRS -> Galactic rotation (frame "galactic") or the identity (frame "icrs").

S is the FIRST-ORDER propagation of the astrometric noise: x is nonlinear in 1/varpi, so S is
accurate only where sigma(varpi)/varpi is small (Bovy et al. 2009 kept parallaxes better than
~10 %); select stars by parallax quality before fitting.

The TOML keys are described in :func:`parse_projection` and in the README ("Catalogue schemas").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ICRS_TO_GALACTIC",
    "K_AU",
    "ProjectionSpec",
    "parse_projection",
]

#: km/s per (mas/yr / mas): one astronomical unit per Julian year (IAU 2012 au, 365.25 d).
K_AU = 4.740470446
#: ICRS -> Galactic rotation A (Hipparcos Catalogue, ESA 1997, vol. 1, sect. 1.5.3, eq. 1.5.11):
#: rows are the Galactic x (towards the Galactic centre, U), y (direction of rotation, V) and
#: z (north Galactic pole, W) axes in ICRS, so r_gal = A r_icrs.
ICRS_TO_GALACTIC = np.array(
    [
        [-0.0548755604, -0.8734370902, -0.4838350155],
        [+0.4941094279, -0.4448296300, +0.7469822445],
        [-0.8676661490, -0.1980763734, +0.4559837762],
    ]
)
#: The 15 elements of the I/311 (Hipparcos new reduction) upper-triangular weight matrix U of
#: (alpha*, delta, varpi, mu_alpha*, mu_delta), stored column by column: element k (1-based) is
#: U[i, j] for the k-th (i, j), i <= j, in the order (0,0), (0,1), (1,1), (0,2), (1,2), (2,2), ...
WEIGHT_MATRIX_LAYOUT = tuple((i, j) for j in range(5) for i in range(j + 1))
#: Positions (0-based, in the weight_matrix list) of the trailing 3 x 3 block of U over
#: (varpi, mu_alpha*, mu_delta): [[U22, U23, U24], [0, U33, U34], [0, 0, U44]].
_TRAILING = {ij: k for k, ij in enumerate(WEIGHT_MATRIX_LAYOUT) if ij[0] >= 2}

_KINDS = ("tangential_velocity",)
_FRAMES = {"galactic": ("U", "V", "W"), "icrs": ("vx", "vy", "vz")}
_ANGLE_TO_RAD = {"rad": 1.0, "deg": math.pi / 180.0}
_PARALLAX_TO_MAS = {"mas": 1.0, "arcsec": 1e3, "uas": 1e-3}
_PM_TO_MAS_PER_YR = {"mas/yr": 1.0, "arcsec/yr": 1e3, "uas/yr": 1e-3}
_UNIT_ALIASES = {
    "degree": "deg",
    "degrees": "deg",
    "radian": "rad",
    "radians": "rad",
    "mas / yr": "mas/yr",
    "mas.yr**-1": "mas/yr",
    "mas yr-1": "mas/yr",
    "km / s": "km/s",
    "km.s**-1": "km/s",
}
_CORR_KEYS = ("parallax_pmra_corr", "parallax_pmdec_corr", "pmra_pmdec_corr")
_COLUMN_KEYS = ("ra", "dec", "parallax", "pmra", "pmdec", "pmra_error", "pmdec_error")
_KEYS = {
    "kind",
    "description",
    "frame",
    "features",
    "unit",
    "observed",
    "angle_unit",
    "parallax_unit",
    "pm_unit",
    "parallax_error",
    "weight_matrix",
    *_COLUMN_KEYS,
    *_CORR_KEYS,
}


class ProjectionError(ValueError):
    """A ``[projection]`` table is malformed (the schema loader re-raises it as SchemaError)."""


@dataclass(frozen=True)
class ProjectionSpec:
    """A parsed ``[projection]`` table (kind ``tangential_velocity``).

    features : (D,) true-feature names (default U, V, W in the Galactic frame, vx, vy, vz in ICRS).
    observed : (d,) observed-value names (default v_alpha, v_delta: km/s along alpha*, delta).
    frame : "galactic" or "icrs", the axes of the true features.
    unit : unit of the true features and of X (km/s).
    ra, dec : position columns, in ``angle_unit`` ("rad" or "deg").
    parallax, pmra, pmdec : value columns (``parallax_unit``, ``pm_unit``; pmra is mu_alpha*).
    pmra_error, pmdec_error : 1-sigma error columns (units of the values).
    parallax_error : 1-sigma parallax error column, or None: the parallax is then taken as exact
        (its term and its correlations drop out of S).
    correlations : (3,) columns of corr(parallax, pmra), corr(parallax, pmdec), corr(pmra, pmdec),
        or None each (0).
    weight_matrix : () or the 15 columns of an I/311 upper-triangular weight matrix, which then
        gives the correlations (exclusive with ``correlations``).
    """

    kind: str
    features: tuple[str, ...]
    observed: tuple[str, ...]
    frame: str
    unit: str
    ra: str
    dec: str
    angle_unit: str
    parallax: str
    pmra: str
    pmdec: str
    pmra_error: str
    pmdec_error: str
    parallax_error: str | None = None
    correlations: tuple[str | None, str | None, str | None] = (None, None, None)
    weight_matrix: tuple[str, ...] = ()
    parallax_unit: str = "mas"
    pm_unit: str = "mas/yr"
    description: str = ""

    @property
    def angle_scale(self) -> float:
        """Radians per unit of ra and dec."""
        return _ANGLE_TO_RAD[self.angle_unit]

    @property
    def velocity_scale(self) -> float:
        """km/s per (pm unit / parallax unit): K_AU times the unit conversions."""
        return K_AU * _PM_TO_MAS_PER_YR[self.pm_unit] / _PARALLAX_TO_MAS[self.parallax_unit]

    @property
    def rotation(self) -> np.ndarray:
        """(3, 3) rotation from ICRS to the frame of the true features."""
        return ICRS_TO_GALACTIC.copy() if self.frame == "galactic" else np.eye(3)

    def weight_columns(self) -> tuple[str, ...]:
        """The weight-matrix columns the projection reads: the trailing block of U over
        (varpi, mu_alpha*, mu_delta), or over (mu_alpha*, mu_delta) without a parallax error.
        The marginal covariance of the last parameters of an upper-triangular U depends only on
        U's trailing block: C[2:, 2:] = (U[2:, 2:])^-1 (U[2:, 2:])^-T."""
        if not self.weight_matrix:
            return ()
        first = 2 if self.parallax_error else 3
        keys = [(i, j) for j in range(first, 5) for i in range(first, j + 1)]
        return tuple(self.weight_matrix[_TRAILING[k]] for k in keys)

    def input_columns(self) -> tuple[str, ...]:
        """Every column read, in the order of ``BuildResult.columns``: ra, dec, parallax, pmra,
        pmdec, pmra_error, pmdec_error, [parallax_error], then correlation or weight columns."""
        cols = [getattr(self, k) for k in _COLUMN_KEYS]
        if self.parallax_error:
            cols.append(self.parallax_error)
        cols += [c for c in self.correlations if c]
        cols += list(self.weight_columns())
        seen: set[str] = set()
        out = []
        for c in cols:
            if c.lower() not in seen:
                seen.add(c.lower())
                out.append(c)
        return tuple(out)

    def noise_columns(self) -> tuple[list[str], list[str]]:
        """([error columns], [correlation or weight-matrix columns]) that S is built from."""
        errs = [self.pmra_error, self.pmdec_error]
        if self.parallax_error:
            errs.insert(0, self.parallax_error)
        return errs, [c for c in self.correlations if c] + list(self.weight_columns())

    def to_dict(self) -> dict[str, Any]:
        """The TOML-shaped table; ``parse_projection(spec.to_dict()) == spec``."""
        d: dict[str, Any] = {
            "kind": self.kind,
            "frame": self.frame,
            "features": list(self.features),
            "unit": self.unit,
            "observed": list(self.observed),
            "angle_unit": self.angle_unit,
            "parallax_unit": self.parallax_unit,
            "pm_unit": self.pm_unit,
        }
        d.update({k: getattr(self, k) for k in _COLUMN_KEYS})
        if self.parallax_error:
            d["parallax_error"] = self.parallax_error
        d.update({k: c for k, c in zip(_CORR_KEYS, self.correlations, strict=True) if c})
        if self.weight_matrix:
            d["weight_matrix"] = list(self.weight_matrix)
        if self.description:
            d["description"] = self.description
        return d


def _norm(unit: Any) -> str:
    u = str(unit).strip()
    return _UNIT_ALIASES.get(u, _UNIT_ALIASES.get(u.lower(), u))


def _names(value: Any, n: int, key: str, where: str) -> tuple[str, ...]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != n
        or not all(isinstance(v, str) and v for v in value)
        or len({v.lower() for v in value}) != n
    ):
        raise ProjectionError(f"{where}: {key!r} must be a list of {n} different non-empty names")
    return tuple(value)


def _column(p: Mapping[str, Any], key: str, where: str, required: bool = True) -> str | None:
    if key not in p:
        if required:
            raise ProjectionError(f"{where}: {key!r} (a column name) is required")
        return None
    v = p[key]
    if not isinstance(v, str) or not v:
        raise ProjectionError(f"{where}: {key!r} must be a column name")
    return v


def _unit(
    p: Mapping[str, Any], key: str, table: Mapping[str, Any], default: str | None, where: str
) -> str:
    if key not in p and default is None:
        raise ProjectionError(f"{where}: {key!r} is required (one of {sorted(table)})")
    u = _norm(p.get(key, default))
    if u not in table:
        raise ProjectionError(f"{where}: {key} {p.get(key)!r} is not one of {sorted(table)}")
    return u


def _noise_columns(
    p: Mapping[str, Any], where: str
) -> tuple[str | None, tuple[str | None, ...], tuple[str, ...]]:
    """(parallax error column or None, the 3 correlation columns or None, the 15 weight-matrix
    columns or ()) of a ``[projection]`` table: correlations or a weight matrix, not both."""
    plx_err = _column(p, "parallax_error", where, required=False)
    corrs = tuple(_column(p, k, where, required=False) for k in _CORR_KEYS)
    if not plx_err and (corrs[0] or corrs[1]):
        raise ProjectionError(
            f"{where}: 'parallax_pmra_corr'/'parallax_pmdec_corr' need 'parallax_error'"
        )
    weights: tuple[str, ...] = ()
    if "weight_matrix" in p:
        if any(corrs):
            raise ProjectionError(f"{where}: give correlation columns or 'weight_matrix', not both")
        wm = p["weight_matrix"]
        if (
            not isinstance(wm, (list, tuple))
            or len(wm) != 15
            or not all(isinstance(c, str) and c for c in wm)
        ):
            raise ProjectionError(
                f"{where}: 'weight_matrix' must list the 15 columns U1..U15 (I/311 order)"
            )
        weights = tuple(wm)
    return plx_err, corrs, weights


def parse_projection(p: Any, source: str = "<dict>") -> ProjectionSpec:
    """Check and parse a ``[projection]`` table.

    Keys (kind ``tangential_velocity``; columns are matched case-insensitively):

    - ``kind`` (required): "tangential_velocity".
    - ``frame``: "galactic" (default; true features U towards the Galactic centre, V in the
      direction of rotation, W towards the north Galactic pole) or "icrs".
    - ``features``: the 3 true-feature names (default ["U", "V", "W"], or ["vx", "vy", "vz"] in
      ICRS); ``unit``: their unit, "km/s" (the only one).
    - ``observed``: the 2 observed-value names (default ["v_alpha", "v_delta"]).
    - ``ra``, ``dec``, ``angle_unit`` ("rad" or "deg"): position columns (all required).
    - ``parallax``, ``pmra`` (mu_alpha* = mu_alpha cos delta), ``pmdec``: value columns;
      ``parallax_unit`` ("mas" default, "arcsec", "uas"), ``pm_unit`` ("mas/yr" default,
      "arcsec/yr", "uas/yr"); errors are in the units of their values.
    - ``pmra_error``, ``pmdec_error`` (required), ``parallax_error`` (optional: without it the
      parallax is exact, so S holds the proper-motion noise only).
    - ``parallax_pmra_corr``, ``parallax_pmdec_corr``, ``pmra_pmdec_corr``: correlation columns
      (each optional, 0 when absent; the parallax ones need ``parallax_error``), or
    - ``weight_matrix``: the 15 columns U1..U15 of the Hipparcos new-reduction (I/311)
      upper-triangular weight matrix of (alpha*, delta, varpi, mu_alpha*, mu_delta), stored column
      by column. Only the CORRELATIONS are taken from it (the errors come from the error
      columns): see the README for why.
    - ``description``: free text.
    """
    where = f"{source}: [projection]"
    if not isinstance(p, Mapping):
        raise ProjectionError(f"{where}: expected a table")
    unknown = set(p) - _KEYS
    if unknown:
        raise ProjectionError(f"{where}: unknown key(s) {sorted(unknown)}")
    kind = p.get("kind")
    if kind not in _KINDS:
        raise ProjectionError(f"{where}: 'kind' must be one of {list(_KINDS)} (got {kind!r})")
    frame = p.get("frame", "galactic")
    if frame not in _FRAMES:
        raise ProjectionError(f"{where}: 'frame' must be one of {sorted(_FRAMES)} (got {frame!r})")
    features = _names(p.get("features", list(_FRAMES[frame])), 3, "features", where)
    observed = _names(p.get("observed", ["v_alpha", "v_delta"]), 2, "observed", where)
    if {f.lower() for f in features} & {o.lower() for o in observed}:
        raise ProjectionError(f"{where}: 'features' and 'observed' must not share names")
    unit = _norm(p.get("unit", "km/s"))
    if unit != "km/s":
        raise ProjectionError(f"{where}: 'unit' must be 'km/s' (got {p.get('unit')!r})")
    cols = {k: _column(p, k, where) for k in _COLUMN_KEYS}
    plx_err, corrs, weights = _noise_columns(p, where)
    description = p.get("description", "")
    if not isinstance(description, str):
        raise ProjectionError(f"{where}: 'description' must be a string")
    return ProjectionSpec(
        kind=str(kind),
        features=features,
        observed=observed,
        frame=str(frame),
        unit=unit,
        angle_unit=_unit(p, "angle_unit", _ANGLE_TO_RAD, None, where),
        parallax_unit=_unit(p, "parallax_unit", _PARALLAX_TO_MAS, "mas", where),
        pm_unit=_unit(p, "pm_unit", _PM_TO_MAS_PER_YR, "mas/yr", where),
        parallax_error=plx_err,
        correlations=corrs,  # type: ignore[arg-type]
        weight_matrix=weights,
        description=description,
        **cols,  # type: ignore[arg-type]
    )

"""Catalogue schemas: which columns are features, how each feature's noise is obtained.

A schema is declared in TOML (the default for Gaia DR3 ships as ``xd_dask/schemas/gaia_dr3.toml``)
or built in code with :func:`plain_schema`. Both give a frozen :class:`CatalogSchema`, which the
covariance builder (:mod:`xd_dask.io.covariance`) turns into X (n, D) and S (n, D, D).

TOML layout::

    name = "my_table"
    id_column = "source_id"          # optional; without it ids are row numbers in the file
    nan_is_null = false              # true: a NaN value is a missing field, not a bad value

    [[feature]]                      # one table per feature, in feature order
    name = "ra"                      # feature name (also the value column unless `column` is set)
    unit = "deg"
    error = "ra_error"               # noise kind 1: a 1-sigma error column ...
    error_unit = "mas"               #   ... in this unit; the scale to feature units is derived
    error_divide_by_cos = "dec"      #   ... and divided by cos(<feature in deg>) (Gaia alpha*)
    min = 0.0                        # optional physical range of the value (feature unit)
    max = 360.0
    error_max = 1000.0               # optional range of the error column (error_unit)
    error_floor = 0.02               # optional noise floor added in quadrature (error_unit)

    [[feature]]
    name = "phot_g_mean_mag"
    unit = "mag"
    flux_over_error = ["phot_g_mean_flux_over_error"]   # noise kind 2: magnitudes from flux S/N
    mag_floor = [0.0027553202]                          #   zero-point term per flux, in mag

    [[feature]]
    name = "teff"
    variance = 2500.0                # noise kind 3: a constant variance (noiseless columns)

    [[correlation]]
    features = ["ra", "dec"]
    column = "ra_dec_corr"

Noise kinds, per feature (exactly one):

- ``error``: sigma = error * error_scale [/ cos(dec)], variance = sigma^2.
- ``flux_over_error``: variance = sum_k (2.5 / ln 10 / f_k)^2 + floor_k^2 over the listed
  flux-over-error columns f_k (one column for a magnitude, two for a colour such as BP - RP).
- ``variance``: a constant, positive variance.

Validation and floors, per feature (all optional; bounds are inclusive):

- ``min`` / ``max``: physical range of the value, in the feature's ``unit``. A row whose observed
  value lies outside is bad (reason ``value_out_of_range``).
- ``error_min`` / ``error_max`` (``error`` noise only): range of the error column's value, in
  ``error_unit`` (the number as the catalogue writes it). Outside: bad (``error_out_of_range``).
- ``error_floor``: a non-negative 1-sigma noise floor in the error's unit (``error_unit`` for
  ``error`` noise, the feature unit otherwise), added in quadrature as an independent noise term:
  S_jj = sigma_j^2 + floor_j^2 (scaled like the error, so divided by cos(dec) too when
  ``error_divide_by_cos`` is set); correlations apply to the catalogue errors only. A row with a
  zero error then has a positive definite S.

Whatever the schema says, a value or a 1-sigma error whose square overflows the working dtype
(|x| above ~1.8e19 for float32, ~1.3e154 for float64), or a variance that underflows it, makes the
row bad (``not_representable``).

Projections (:mod:`xd_dask.io.projection`): instead of ``[[feature]]`` tables, a ``[projection]``
table derives d observed values and a per-row projection R (d x D) from catalogue columns, e.g.
tangential velocities (d = 2) of the 3-d velocity (D = 3)::

    name = "hip2_vtan"
    id_column = "HIP"

    [projection]
    kind = "tangential_velocity"
    frame = "galactic"               # true features U, V, W [km/s]
    ra = "RArad"
    dec = "DErad"
    angle_unit = "rad"
    parallax = "Plx"                 # mas
    pmra = "pmRA"                    # mas/yr (mu_alpha*)
    pmdec = "pmDE"
    parallax_error = "e_Plx"
    pmra_error = "e_pmRA"
    pmdec_error = "e_pmDE"
    pmra_pmdec_corr = "..."          # or weight_matrix = ["UW1", ..., "UW15"]

``features`` are then the D TRUE features (the model's space) and ``observed`` the d observed
values (the columns of X); without a projection the two are the same.

Selection (:mod:`xd_dask.io.selection`): a ``[selection]`` table of cuts on columns and derived
quantities (ratios, absolute magnitudes, sums of them) says which rows form the sample. Rows
outside it are excluded and counted as ``not_selected`` whatever ``on_bad`` says; they are not
bad rows. A schema may start from another with ``extends = "<packaged schema or TOML path>"``:
its top-level keys and tables replace the base's (e.g. a selection added to a projection).

Unknown keys are an error (a typo must not be a setting that is silently ignored).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from xd_dask.io.projection import ProjectionError, ProjectionSpec, parse_projection
from xd_dask.io.selection import Selection, SelectionError, parse_selection

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "CatalogSchema",
    "Correlation",
    "NoiseSpec",
    "ProjectionSpec",
    "SchemaError",
    "Selection",
    "load_schema",
    "plain_schema",
    "packaged_schemas",
]

#: 2.5 / ln(10): d(mag) = MAG_PER_LN_FLUX * d(flux) / flux.
MAG_PER_LN_FLUX = 2.5 / math.log(10.0)

# Conversion factors to degrees; used to derive error_scale from error_unit -> unit.
_ANGLE_IN_DEG = {
    "deg": 1.0,
    "arcmin": 1.0 / 60.0,
    "arcsec": 1.0 / 3600.0,
    "mas": 1.0 / 3.6e6,
    "uas": 1.0 / 3.6e9,
    "rad": 180.0 / math.pi,
}
_PM_IN_MAS_PER_YR = {"mas/yr": 1.0, "arcsec/yr": 1e3, "uas/yr": 1e-3}
_UNIT_ALIASES = {
    "degree": "deg",
    "degrees": "deg",
    "mas.yr**-1": "mas/yr",
    "mas yr-1": "mas/yr",
    "mas.yr-1": "mas/yr",
    "mas / yr": "mas/yr",
    "arcsec.yr**-1": "arcsec/yr",
    "µas": "uas",
    "uas.yr**-1": "uas/yr",
}


class SchemaError(ValueError):
    """A catalogue schema is malformed (the message names the schema source and the key)."""


@dataclass(frozen=True)
class NoiseSpec:
    """How one feature's noise variance is obtained from a row.

    kind : "error" | "flux_over_error" | "variance".
    columns : the error column (kind "error") or the flux-over-error columns.
    scale : multiplies the error column to give the error in feature units (kind "error").
    divide_by_cos : feature name (in degrees) whose cosine divides the error (Gaia alpha*).
    mag_floors : zero-point term per flux-over-error column, in mag.
    variance : the constant variance (kind "variance").
    error_unit : unit of the error column (kind "error").
    error_range : inclusive (min, max) of the error column's value, in ``error_unit`` (kind
        "error"; unbounded by default).
    floor : 1-sigma noise floor added in quadrature, in the error's unit (``error_unit`` for kind
        "error", the feature unit otherwise).
    """

    kind: str
    columns: tuple[str, ...] = ()
    scale: float = 1.0
    divide_by_cos: str | None = None
    mag_floors: tuple[float, ...] = ()
    variance: float = 0.0
    error_unit: str = ""
    error_range: tuple[float, float] = (-math.inf, math.inf)
    floor: float = 0.0


@dataclass(frozen=True)
class Correlation:
    """A correlation-coefficient column coupling two features."""

    features: tuple[str, str]
    column: str


@dataclass(frozen=True)
class CatalogSchema:
    """Declared layout of a catalogue: features (D), value columns, noise, correlations.

    Attributes
    ----------
    name : schema name (recorded in manifests and fit records).
    features : (D,) the TRUE features, the space of the mixture (``XDModel.feature_names``).
        Without a projection they are also the columns of X, in order.
    units : (D,) unit of each feature (of X and of sqrt of the diagonal of S without a
        projection).
    id_column : row-id column (int64), or None for row numbers within the file.
    columns : (D,) value column of each feature.
    noise : (D,) :class:`NoiseSpec` per feature.
    correlations : :class:`Correlation` entries (off-diagonal terms of S).
    value_ranges : (D,) inclusive (min, max) of each feature's value, or () for none.
    nan_is_null : treat NaN values as missing fields (else NaN is a bad value).
    description : free text documenting the feature space.
    projection : a :class:`ProjectionSpec` (then X holds the d ``observed`` values, the reader
        returns R (n, d, D), and ``columns``/``noise``/``correlations`` are empty), or None.
    selection : a :class:`~xd_dask.io.selection.Selection` (rows outside it are ``not_selected``),
        or None (every row is in the sample).
    """

    name: str
    features: tuple[str, ...]
    units: tuple[str, ...]
    id_column: str | None
    columns: tuple[str, ...] = ()
    noise: tuple[NoiseSpec, ...] = ()
    correlations: tuple[Correlation, ...] = ()
    nan_is_null: bool = False
    description: str = field(default="", compare=False)
    value_ranges: tuple[tuple[float, float], ...] = ()
    projection: ProjectionSpec | None = None
    selection: Selection | None = None

    @property
    def observed(self) -> tuple[str, ...]:
        """(d,) names of the columns of X: the projection's observed values, else ``features``."""
        return self.projection.observed if self.projection is not None else self.features

    @property
    def n_observed(self) -> int:
        """d, the number of columns of X (= D without a projection)."""
        return len(self.observed)

    def noise_columns(self) -> tuple[list[str], list[str]]:
        """([error columns], [correlation columns]) that S is built from (for messages)."""
        if self.projection is not None:
            return self.projection.noise_columns()
        return [c for s in self.noise for c in s.columns], [c.column for c in self.correlations]

    def value_range(self, j: int) -> tuple[float, float]:
        """Inclusive (min, max) of feature ``j``'s value ((-inf, inf) when unbounded)."""
        return self.value_ranges[j] if self.value_ranges else (-math.inf, math.inf)

    @property
    def n_features(self) -> int:
        """D, the number of true features (of the mixture's means)."""
        return len(self.features)

    def feature_index(self, name: str) -> int:
        try:
            return self.features.index(name)
        except ValueError:
            raise KeyError(f"schema {self.name!r} has no feature {name!r}") from None

    def required_columns(self) -> list[str]:
        """All columns the reader needs (id first, then values, noise, correlations), no repeats."""
        cols: list[str] = [self.id_column] if self.id_column else []
        if self.projection is not None:
            cols += list(self.projection.input_columns())
        cols += list(self.columns)
        for spec in self.noise:
            cols += list(spec.columns)
        cols += [c.column for c in self.correlations]
        if self.selection is not None:
            cols += self.selection.columns()
        seen: set[str] = set()
        out = []
        for c in cols:
            if c.lower() not in seen:
                seen.add(c.lower())
                out.append(c)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The schema as a TOML-shaped dict; ``load_schema(s.to_dict()) == s``."""
        d: dict[str, Any] = {"name": self.name, "nan_is_null": self.nan_is_null}
        if self.description:
            d["description"] = self.description
        if self.id_column:
            d["id_column"] = self.id_column
        if self.selection is not None:
            d["selection"] = self.selection.to_dict()
        if self.projection is not None:
            d["projection"] = self.projection.to_dict()
            return d
        feats = []
        rows = zip(self.features, self.columns, self.units, self.noise, strict=True)
        for j, (name, col, unit, spec) in enumerate(rows):
            f: dict[str, Any] = {"name": name, "column": col, "unit": unit}
            lo, hi = self.value_range(j)
            if math.isfinite(lo):
                f["min"] = lo
            if math.isfinite(hi):
                f["max"] = hi
            if spec.kind == "error":
                f["error"] = spec.columns[0]
                f["error_unit"] = spec.error_unit
                f["error_scale"] = spec.scale
                if spec.divide_by_cos:
                    f["error_divide_by_cos"] = spec.divide_by_cos
            elif spec.kind == "flux_over_error":
                f["flux_over_error"] = list(spec.columns)
                f["mag_floor"] = list(spec.mag_floors)
            else:
                f["variance"] = spec.variance
            if math.isfinite(spec.error_range[0]):
                f["error_min"] = spec.error_range[0]
            if math.isfinite(spec.error_range[1]):
                f["error_max"] = spec.error_range[1]
            if spec.floor > 0:
                f["error_floor"] = spec.floor
            feats.append(f)
        d["feature"] = feats
        d["correlation"] = [
            {"features": list(c.features), "column": c.column} for c in self.correlations
        ]
        return d


# --------------------------------------------------------------------------- parsing
def _norm_unit(unit: str) -> str:
    u = unit.strip()
    return _UNIT_ALIASES.get(u, _UNIT_ALIASES.get(u.lower(), u))


def unit_scale(from_unit: str, to_unit: str) -> float | None:
    """Factor converting a quantity in ``from_unit`` to ``to_unit``; None when unknown."""
    a, b = _norm_unit(from_unit), _norm_unit(to_unit)
    if a == b:
        return 1.0
    for table in (_ANGLE_IN_DEG, _PM_IN_MAS_PER_YR):
        if a in table and b in table:
            return table[a] / table[b]
    return None


def _as_str_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise SchemaError(f"{where}: expected a column name or a list of column names")
    return list(value)


_FEATURE_KEYS = {
    "name",
    "column",
    "unit",
    "description",
    "error",
    "error_unit",
    "error_scale",
    "error_divide_by_cos",
    "flux_over_error",
    "mag_floor",
    "variance",
    "min",
    "max",
    "error_min",
    "error_max",
    "error_floor",
}
_TOP_KEYS = {
    "name",
    "description",
    "id_column",
    "nan_is_null",
    "feature",
    "correlation",
    "projection",
    "selection",
    "extends",
}


def _number(f: Mapping[str, Any], key: str, where: str, default: float) -> float:
    """``f[key]`` as a float (``default`` when absent); NaN, booleans and strings are errors."""
    if key not in f:
        return default
    v = f[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise SchemaError(f"{where}: {key!r} must be a number")
    return float(v)


def _parse_bounds(f: Mapping[str, Any], keys: tuple[str, str], where: str) -> tuple[float, float]:
    lo = _number(f, keys[0], where, -math.inf)
    hi = _number(f, keys[1], where, math.inf)
    if not lo <= hi:
        raise SchemaError(f"{where}: {keys[0]} ({lo!r}) is above {keys[1]} ({hi!r})")
    return lo, hi


def _parse_feature(
    f: Any, i: int, src: str
) -> tuple[str, str, str, NoiseSpec, tuple[float, float]]:
    where = f"{src}: feature[{i}]"
    if not isinstance(f, Mapping):
        raise SchemaError(f"{where}: expected a table")
    unknown = set(f) - _FEATURE_KEYS
    if unknown:
        raise SchemaError(f"{where}: unknown key(s) {sorted(unknown)}")
    name = f.get("name")
    if not isinstance(name, str) or not name:
        raise SchemaError(f"{where}: 'name' (a non-empty string) is required")
    where = f"{src}: feature {name!r}"
    column = f.get("column", name)
    if not isinstance(column, str) or not column:
        raise SchemaError(f"{where}: 'column' must be a non-empty string")
    unit = str(f.get("unit", ""))
    kinds = [k for k in ("error", "flux_over_error", "variance") if k in f]
    if len(kinds) != 1:
        raise SchemaError(
            f"{where}: give exactly one of 'error', 'flux_over_error', 'variance' (got {kinds})"
        )
    kind = kinds[0]
    extras = {
        "error": {"error_unit", "error_scale", "error_divide_by_cos"},
        "flux_over_error": {"mag_floor"},
        "variance": set(),
    }
    for other, keys in extras.items():
        if other != kind and keys & set(f):
            raise SchemaError(f"{where}: {sorted(keys & set(f))} only apply to '{other}' noise")
    value_range = _parse_bounds(f, ("min", "max"), where)
    if kind != "error" and ({"error_min", "error_max"} & set(f)):
        raise SchemaError(
            f"{where}: 'error_min'/'error_max' bound an error column, so they need 'error' noise"
        )
    error_range = _parse_bounds(f, ("error_min", "error_max"), where)
    if "error_min" in f and error_range[0] < 0:
        raise SchemaError(f"{where}: 'error_min' must be >= 0")
    floor = _number(f, "error_floor", where, 0.0)
    if not (floor >= 0 and math.isfinite(floor)):
        raise SchemaError(f"{where}: 'error_floor' must be a non-negative finite number")
    if kind == "error":
        col = f["error"]
        if not isinstance(col, str) or not col:
            raise SchemaError(f"{where}: 'error' must be a column name")
        err_unit = str(f.get("error_unit", unit))
        derived = unit_scale(err_unit, unit) if err_unit and unit else None
        if "error_scale" in f:
            scale = f["error_scale"]
            if not isinstance(scale, (int, float)) or not (scale > 0 and math.isfinite(scale)):
                raise SchemaError(f"{where}: 'error_scale' must be a positive number")
            if derived is not None and not math.isclose(scale, derived, rel_tol=1e-9):
                raise SchemaError(
                    f"{where}: error_scale {scale!r} contradicts error_unit {err_unit!r} -> unit "
                    f"{unit!r} (expected {derived!r}); fix one of them"
                )
        elif derived is None and err_unit and unit:
            raise SchemaError(
                f"{where}: cannot convert error_unit {err_unit!r} to unit {unit!r}; "
                "give 'error_scale' explicitly"
            )
        else:
            scale = 1.0 if derived is None else derived
        cos_of = f.get("error_divide_by_cos")
        if cos_of is not None and (not isinstance(cos_of, str) or not cos_of):
            raise SchemaError(f"{where}: 'error_divide_by_cos' must be a feature name")
        spec = NoiseSpec(
            "error",
            (col,),
            scale=float(scale),
            divide_by_cos=cos_of,
            error_unit=err_unit,
            error_range=error_range,
            floor=floor,
        )
    elif kind == "flux_over_error":
        cols = _as_str_list(f["flux_over_error"], f"{where}: flux_over_error")
        floors = f.get("mag_floor", [0.0] * len(cols))
        if isinstance(floors, (int, float)):
            floors = [floors]
        if len(floors) != len(cols) or not all(
            isinstance(x, (int, float)) and x >= 0 and math.isfinite(x) for x in floors
        ):
            raise SchemaError(
                f"{where}: 'mag_floor' needs one non-negative number per flux_over_error column"
            )
        if unit and _norm_unit(unit) != "mag":
            raise SchemaError(f"{where}: flux_over_error noise gives magnitudes; unit is {unit!r}")
        spec = NoiseSpec(
            "flux_over_error",
            tuple(cols),
            mag_floors=tuple(float(x) for x in floors),
            floor=floor,
        )
    else:
        var = f["variance"]
        if not isinstance(var, (int, float)) or not (var > 0 and math.isfinite(var)):
            raise SchemaError(
                f"{where}: 'variance' must be a positive finite number (a floor variance keeps "
                "the noise covariance positive definite)"
            )
        spec = NoiseSpec("variance", (), variance=float(var), floor=floor)
    return name, column, unit, spec, value_range


def _extended(d: Mapping[str, Any], source: str, depth: int = 0) -> dict[str, Any]:
    """``d`` with its ``extends`` resolved: the base schema's tables, then ``d``'s on top."""
    base_spec = d["extends"]
    if not isinstance(base_spec, str) or not base_spec:
        raise SchemaError(f"{source}: 'extends' must name a packaged schema or a TOML file")
    if depth > 8:
        raise SchemaError(f"{source}: 'extends' chain is too deep (a cycle?)")
    base, base_source = _raw_schema(base_spec)
    if not isinstance(base, Mapping):
        raise SchemaError(f"{base_source}: a schema must be a table/dict")
    if "extends" in base:
        base = _extended(base, base_source, depth + 1)
    merged = {k: v for k, v in base.items() if k not in ("extends", "name", "description")}
    merged.update({k: v for k, v in d.items() if k != "extends"})
    return merged


def schema_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> CatalogSchema:
    """Build and check a :class:`CatalogSchema` from a TOML-shaped mapping."""
    if not isinstance(d, Mapping):
        raise SchemaError(f"{source}: a schema must be a table/dict")
    unknown = set(d) - _TOP_KEYS
    if unknown:
        raise SchemaError(f"{source}: unknown key(s) {sorted(unknown)}")
    if "extends" in d:
        d = _extended(d, source)
    selection = None
    if "selection" in d:
        try:
            selection = parse_selection(d["selection"], source)
        except SelectionError as exc:
            raise SchemaError(str(exc)) from None
    name = d.get("name", Path(source).stem if source != "<dict>" else "custom")
    id_column = d.get("id_column")
    if id_column is not None and (not isinstance(id_column, str) or not id_column):
        raise SchemaError(f"{source}: 'id_column' must be a column name")
    nan_is_null = d.get("nan_is_null", False)
    if not isinstance(nan_is_null, bool):
        raise SchemaError(f"{source}: 'nan_is_null' must be true or false")
    description = d.get("description", "")
    if "projection" in d:
        if d.get("feature") or d.get("correlation"):
            raise SchemaError(
                f"{source}: a schema with [projection] takes no [[feature]] or [[correlation]] "
                "tables (the projection defines the observed values and their noise)"
            )
        try:
            spec = parse_projection(d["projection"], source)
        except ProjectionError as exc:
            raise SchemaError(str(exc)) from None
        return CatalogSchema(
            name=str(name),
            features=spec.features,
            units=(spec.unit,) * len(spec.features),
            id_column=id_column,
            nan_is_null=nan_is_null,
            description=str(description),
            projection=spec,
            selection=selection,
        )
    feats = d.get("feature")
    if not isinstance(feats, Sequence) or not feats:
        raise SchemaError(f"{source}: at least one [[feature]] is required")
    parsed = [_parse_feature(f, i, source) for i, f in enumerate(feats)]
    names = tuple(p[0] for p in parsed)
    if len({n.lower() for n in names}) != len(names):
        raise SchemaError(f"{source}: duplicate feature names in {names}")
    units = tuple(p[2] for p in parsed)
    for n, (_, _, _, spec, _) in zip(names, parsed, strict=True):
        if spec.divide_by_cos is not None:
            if spec.divide_by_cos not in names:
                raise SchemaError(
                    f"{source}: feature {n!r}: error_divide_by_cos {spec.divide_by_cos!r} "
                    "is not a feature"
                )
            u = _norm_unit(units[names.index(spec.divide_by_cos)])
            if u != "deg":
                raise SchemaError(
                    f"{source}: feature {n!r}: error_divide_by_cos needs a feature in deg, "
                    f"{spec.divide_by_cos!r} is in {u!r}"
                )
    corrs = []
    seen_pairs: set[frozenset[str]] = set()
    for i, c in enumerate(d.get("correlation", []) or []):
        where = f"{source}: correlation[{i}]"
        if not isinstance(c, Mapping) or set(c) - {"features", "column"}:
            raise SchemaError(f"{where}: expected a table with 'features' and 'column' only")
        fs = c.get("features")
        col = c.get("column")
        if (
            not isinstance(fs, Sequence)
            or isinstance(fs, str)
            or len(fs) != 2
            or fs[0] == fs[1]
            or any(x not in names for x in fs)
        ):
            raise SchemaError(f"{where}: 'features' must name two different features of {names}")
        if not isinstance(col, str) or not col:
            raise SchemaError(f"{where}: 'column' must be a column name")
        pair = frozenset(fs)
        if pair in seen_pairs:
            raise SchemaError(f"{where}: features {list(fs)} are already correlated")
        seen_pairs.add(pair)
        corrs.append(Correlation((str(fs[0]), str(fs[1])), col))
    ranges = tuple(p[4] for p in parsed)
    return CatalogSchema(
        name=str(name),
        features=names,
        units=units,
        id_column=id_column,
        columns=tuple(p[1] for p in parsed),
        noise=tuple(p[3] for p in parsed),
        correlations=tuple(corrs),
        nan_is_null=nan_is_null,
        description=str(description),
        value_ranges=ranges if any(r != (-math.inf, math.inf) for r in ranges) else (),
        selection=selection,
    )


def packaged_schemas() -> list[str]:
    """Names of the schemas shipped with the package (``xd_dask/schemas/*.toml``)."""
    root = resources.files("xd_dask") / "schemas"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_schema(
    spec: CatalogSchema | Mapping[str, Any] | str | os.PathLike | None = None,
) -> CatalogSchema:
    """Resolve a schema: None or "gaia_dr3" (packaged default), a packaged name, a TOML path,
    a TOML-shaped dict, or a :class:`CatalogSchema` (returned unchanged)."""
    if isinstance(spec, CatalogSchema):
        return spec
    if spec is None:
        spec = "gaia_dr3"
    if isinstance(spec, Mapping):
        return schema_from_dict(spec)
    return schema_from_dict(*_raw_schema(spec))


def _raw_schema(spec: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(the TOML table, its source name) of a packaged schema name or a TOML path."""
    text_spec = os.fspath(spec)
    if isinstance(spec, str) and spec in packaged_schemas():
        res = resources.files("xd_dask") / "schemas" / f"{spec}.toml"
        return tomllib.loads(res.read_text(encoding="utf-8")), f"{spec}.toml"
    path = Path(text_spec)
    if not path.is_file():
        raise SchemaError(
            f"{text_spec}: no such schema file, and not a packaged schema "
            f"(packaged: {', '.join(packaged_schemas())})"
        )
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), str(path)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SchemaError(f"{path}: cannot read schema TOML: {exc}") from None


def plain_schema(
    features: Sequence[str],
    errors: Sequence[str | float],
    correlations: Mapping[tuple[str, str], str] | Sequence[tuple[str, str, str]] | None = None,
    id_column: str | None = None,
    *,
    units: Sequence[str] | None = None,
    name: str = "plain",
    nan_is_null: bool = False,
) -> CatalogSchema:
    """A schema for a non-Gaia table: value columns, their error columns, optional correlations.

    Parameters
    ----------
    features : (D,) value column names (also the feature names).
    errors : (D,) per feature either a 1-sigma error column name (same unit as the feature) or a
        positive number, a constant 1-sigma error (for noiseless columns use a small floor).
    correlations : {(feature_a, feature_b): column} or [(feature_a, feature_b, column), ...].
    id_column : row-id column; None gives row numbers.
    units : (D,) units (documentation only; no conversion is applied).
    """
    if len(errors) != len(features):
        raise SchemaError(f"plain schema: {len(features)} features but {len(errors)} errors")
    feats = []
    for i, (f, e) in enumerate(zip(features, errors, strict=True)):
        entry: dict[str, Any] = {"name": f, "unit": units[i] if units else ""}
        if isinstance(e, str):
            entry["error"] = e
        elif isinstance(e, (int, float)) and e > 0 and math.isfinite(e):
            entry["variance"] = float(e) ** 2
        else:
            raise SchemaError(
                f"plain schema: feature {f!r}: error must be a column name or a positive number"
            )
        feats.append(entry)
    items: list[tuple[str, str, str]]
    if correlations is None:
        items = []
    elif isinstance(correlations, Mapping):
        items = [(a, b, col) for (a, b), col in correlations.items()]
    else:
        items = [tuple(c) for c in correlations]  # type: ignore[misc]
    corr = [{"features": [a, b], "column": col} for a, b, col in items]
    d: dict[str, Any] = {
        "name": name,
        "nan_is_null": nan_is_null,
        "feature": feats,
        "correlation": corr,
    }
    if id_column:
        d["id_column"] = id_column
    return schema_from_dict(d, f"plain schema {name!r}")

"""Parsing a schema's ``[[feature]]`` and ``[[correlation]]`` tables (see :mod:`xd_dask.io.schema`
for the TOML layout): the noise of each feature, its ranges, unit conversions, and the errors that
name the schema source and the key."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Correlation",
    "NoiseSpec",
    "SchemaError",
    "parse_correlations",
    "parse_feature",
    "unit_scale",
]

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


def _feature_header(f: Any, i: int, src: str) -> tuple[str, str, str, str]:
    """(where, name, column, unit) of feature table ``f`` (``where`` names it in messages)."""
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
    return where, name, column, str(f.get("unit", ""))


def _noise_kind(f: Mapping[str, Any], where: str) -> str:
    """The one noise kind of a feature table; keys of the other kinds are errors."""
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
    return kind


def _error_scale(f: Mapping[str, Any], where: str, err_unit: str, unit: str) -> float:
    """The factor from the error column's unit to the feature's: ``error_scale`` checked against
    the units, else derived from them."""
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
        return float(scale)
    if derived is None and err_unit and unit:
        raise SchemaError(
            f"{where}: cannot convert error_unit {err_unit!r} to unit {unit!r}; "
            "give 'error_scale' explicitly"
        )
    return float(1.0 if derived is None else derived)


def _error_noise(
    f: Mapping[str, Any], where: str, unit: str, error_range: tuple[float, float], floor: float
) -> NoiseSpec:
    col = f["error"]
    if not isinstance(col, str) or not col:
        raise SchemaError(f"{where}: 'error' must be a column name")
    err_unit = str(f.get("error_unit", unit))
    scale = _error_scale(f, where, err_unit, unit)
    cos_of = f.get("error_divide_by_cos")
    if cos_of is not None and (not isinstance(cos_of, str) or not cos_of):
        raise SchemaError(f"{where}: 'error_divide_by_cos' must be a feature name")
    return NoiseSpec(
        "error",
        (col,),
        scale=scale,
        divide_by_cos=cos_of,
        error_unit=err_unit,
        error_range=error_range,
        floor=floor,
    )


def _flux_noise(f: Mapping[str, Any], where: str, unit: str, floor: float) -> NoiseSpec:
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
    return NoiseSpec(
        "flux_over_error", tuple(cols), mag_floors=tuple(float(x) for x in floors), floor=floor
    )


def _variance_noise(f: Mapping[str, Any], where: str, floor: float) -> NoiseSpec:
    var = f["variance"]
    if not isinstance(var, (int, float)) or not (var > 0 and math.isfinite(var)):
        raise SchemaError(
            f"{where}: 'variance' must be a positive finite number (a floor variance keeps "
            "the noise covariance positive definite)"
        )
    return NoiseSpec("variance", (), variance=float(var), floor=floor)


def parse_feature(f: Any, i: int, src: str) -> tuple[str, str, str, NoiseSpec, tuple[float, float]]:
    """(name, column, unit, noise, value range) of the ``i``-th ``[[feature]]`` table of ``src``."""
    where, name, column, unit = _feature_header(f, i, src)
    kind = _noise_kind(f, where)
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
        spec = _error_noise(f, where, unit, error_range, floor)
    elif kind == "flux_over_error":
        spec = _flux_noise(f, where, unit, floor)
    else:
        spec = _variance_noise(f, where, floor)
    return name, column, unit, spec, value_range


def check_divide_by_cos(
    names: tuple[str, ...], units: tuple[str, ...], noise: Sequence[NoiseSpec], source: str
) -> None:
    """Every ``error_divide_by_cos`` names a feature in degrees."""
    for n, spec in zip(names, noise, strict=True):
        if spec.divide_by_cos is None:
            continue
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


def parse_correlations(tables: Any, names: tuple[str, ...], source: str) -> tuple[Correlation, ...]:
    """The ``[[correlation]]`` tables: two different features each, no pair twice."""
    corrs = []
    seen_pairs: set[frozenset[str]] = set()
    for i, c in enumerate(tables or []):
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
    return tuple(corrs)

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
from xd_dask.io.schema_parse import (
    Correlation,
    NoiseSpec,
    SchemaError,
    check_divide_by_cos,
    parse_correlations,
    parse_feature,
    unit_scale,
)
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
    "schema_from_dict",
    "unit_scale",
]

#: 2.5 / ln(10): d(mag) = MAG_PER_LN_FLUX * d(flux) / flux.
MAG_PER_LN_FLUX = 2.5 / math.log(10.0)


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
    common = _top_level(d, source)
    if "projection" in d:
        return _projection_schema(d, source, common)
    feats = d.get("feature")
    if not isinstance(feats, Sequence) or not feats:
        raise SchemaError(f"{source}: at least one [[feature]] is required")
    parsed = [parse_feature(f, i, source) for i, f in enumerate(feats)]
    names = tuple(p[0] for p in parsed)
    if len({n.lower() for n in names}) != len(names):
        raise SchemaError(f"{source}: duplicate feature names in {names}")
    units = tuple(p[2] for p in parsed)
    noise = tuple(p[3] for p in parsed)
    check_divide_by_cos(names, units, noise, source)
    corrs = parse_correlations(d.get("correlation", []), names, source)
    ranges = tuple(p[4] for p in parsed)
    return CatalogSchema(
        features=names,
        units=units,
        columns=tuple(p[1] for p in parsed),
        noise=noise,
        correlations=corrs,
        value_ranges=ranges if any(r != (-math.inf, math.inf) for r in ranges) else (),
        **common,
    )


def _top_level(d: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The keyword arguments of :class:`CatalogSchema` that every schema has: name, id_column,
    nan_is_null, description, selection."""
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
    return {
        "name": str(name),
        "id_column": id_column,
        "nan_is_null": nan_is_null,
        "description": str(d.get("description", "")),
        "selection": selection,
    }


def _projection_schema(d: Mapping[str, Any], source: str, common: dict[str, Any]) -> CatalogSchema:
    """A schema whose ``[projection]`` defines the observed values and their noise."""
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
        features=spec.features,
        units=(spec.unit,) * len(spec.features),
        projection=spec,
        **common,
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

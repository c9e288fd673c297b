"""Catalogue schemas: the packaged Gaia DR3 default, TOML files, plain schemas, malformed input."""

from __future__ import annotations

import copy

import pytest

from xd_dask.io import SchemaError, load_schema, plain_schema
from xd_dask.io.schema import schema_from_dict, unit_scale


def test_packaged_gaia_schema():
    s = load_schema()
    assert s is not None and s == load_schema("gaia_dr3")
    assert s.features == ("ra", "dec", "parallax", "pmra", "pmdec", "bp_rp", "phot_g_mean_mag")
    assert s.units == ("deg", "deg", "mas", "mas/yr", "mas/yr", "mag", "mag")
    assert s.id_column == "source_id" and len(s.correlations) == 10
    ra, dec = s.noise[0], s.noise[1]
    assert ra.columns == ("ra_error",) and ra.divide_by_cos == "dec"
    assert ra.scale == pytest.approx(1 / 3.6e6, rel=1e-15) and dec.divide_by_cos is None
    assert s.noise[5].columns == (
        "phot_bp_mean_flux_over_error",
        "phot_rp_mean_flux_over_error",
    )
    assert s.noise[5].mag_floors == (0.0027901700, 0.0037793818)
    assert s.noise[6].mag_floors == (0.0027553202,)
    req = s.required_columns()
    assert len(req) == 26 and req[0] == "source_id" and len(set(req)) == 26
    assert load_schema(s.to_dict()) == s
    assert "deg" in s.description


def test_toml_file_and_unit_derivation(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        """
name = "mine"
id_column = "id"

[[feature]]
name = "lon"
unit = "deg"
error = "lon_err"
error_unit = "arcsec"

[[feature]]
name = "mu"
unit = "mas/yr"
error = "mu_err"
error_unit = "arcsec.yr**-1"

[[feature]]
name = "teff"
variance = 2500.0

[[correlation]]
features = ["lon", "mu"]
column = "lon_mu_corr"
"""
    )
    s = load_schema(path)
    assert s.name == "mine" and s.noise[0].scale == pytest.approx(1 / 3600)
    assert s.noise[1].scale == pytest.approx(1000.0) and s.noise[2].variance == 2500.0
    assert s.required_columns() == ["id", "lon", "mu", "teff", "lon_err", "mu_err", "lon_mu_corr"]
    assert unit_scale("mas", "deg") == pytest.approx(1 / 3.6e6) and unit_scale("mag", "deg") is None


BASE = {
    "name": "t",
    "feature": [
        {"name": "ra", "unit": "deg", "error": "ra_error", "error_unit": "mas", "max": 360.0},
        {"name": "dec", "unit": "deg", "error": "dec_error", "error_unit": "mas"},
        {"name": "g", "unit": "mag", "flux_over_error": ["g_foe"], "error_floor": 0.01},
    ],
    "correlation": [{"features": ["ra", "dec"], "column": "ra_dec_corr"}],
}


def _with(path, value):
    d = copy.deepcopy(BASE)
    target = d
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return d


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("colour",), "x", r"unknown key\(s\) \['colour'\]"),
        (("feature", 0, "eror"), "x", r"unknown key\(s\) \['eror'\]"),
        (("feature", 0, "error_scale"), 1e-3, "contradicts"),
        (("feature", 0, "error_divide_by_cos"), "g", "needs a feature in deg"),
        (("feature", 0, "error_divide_by_cos"), "nope", "is not a feature"),
        (("feature", 1, "name"), "ra", "duplicate feature"),
        (("feature", 2, "mag_floor"), [0.1, 0.2], "one non-negative number"),
        (("feature", 2, "unit"), "deg", "gives magnitudes"),
        (("feature", 2, "variance"), 1.0, "exactly one of"),
        (("feature", 1, "error"), KeyError, "exactly one of"),
        (("correlation", 0, "features"), ["ra", "ra"], "two different features"),
        (("correlation", 0, "features"), ["ra", "x"], "two different features"),
        (("nan_is_null",), "yes", "true or false"),
        (("feature",), [], "at least one"),
        (("feature", 0, "min"), "0", "'min' must be a number"),
        (("feature", 0, "min"), 400.0, r"min \(400.0\) is above max"),
        (("feature", 0, "max"), float("nan"), "'max' must be a number"),
        (("feature", 2, "error_max"), 1.0, "need 'error' noise"),
        (("feature", 0, "error_min"), -1.0, "'error_min' must be >= 0"),
        (("feature", 0, "error_floor"), -0.1, "'error_floor' must be a non-negative"),
        (("feature", 0, "error_floor"), float("inf"), "'error_floor' must be a non-negative"),
    ],
)
def test_malformed_schemas_are_rejected(path, value, match):
    schema_from_dict(BASE)  # the base is valid
    with pytest.raises(SchemaError, match=match):
        schema_from_dict(_with(path, value))


def test_duplicate_correlation_and_bad_variance():
    d = copy.deepcopy(BASE)
    d["correlation"].append({"features": ["dec", "ra"], "column": "other"})
    with pytest.raises(SchemaError, match="already correlated"):
        schema_from_dict(d)
    d = copy.deepcopy(BASE)
    d["feature"][2] = {"name": "g", "variance": 0.0}
    with pytest.raises(SchemaError, match="positive finite"):
        schema_from_dict(d)


def test_missing_or_broken_schema_files(tmp_path):
    with pytest.raises(SchemaError, match="no such schema file"):
        load_schema(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed\n")
    with pytest.raises(SchemaError, match="cannot read schema TOML"):
        load_schema(bad)


def test_plain_schema():
    s = plain_schema(
        ["a", "b", "c"], ["ea", "eb", 0.5], {("a", "b"): "rab"}, id_column="id", nan_is_null=True
    )
    assert s.features == ("a", "b", "c") and s.id_column == "id" and s.nan_is_null
    assert s.noise[2].kind == "variance" and s.noise[2].variance == 0.25
    assert s.noise[0].scale == 1.0 and s.correlations[0].column == "rab"
    assert load_schema(s.to_dict()) == s
    s2 = plain_schema(["a", "b"], ["ea", "eb"], [("a", "b", "rab")])
    assert s2.correlations[0].features == ("a", "b") and s2.id_column is None
    with pytest.raises(SchemaError, match="2 features but 1 errors"):
        plain_schema(["a", "b"], ["ea"])
    with pytest.raises(SchemaError, match="positive number"):
        plain_schema(["a"], [-1.0])

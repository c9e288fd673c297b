"""The [projection] table of a schema: keys, checks, the features/observed contract, round trip."""

from __future__ import annotations

import pytest

from xd_dask.io import SchemaError, load_schema
from xd_dask.io.schema import packaged_schemas, schema_from_dict

GAIA = "gaia_dr3_tangential_velocity"


def _schema(**changes) -> dict:
    """The packaged Gaia schema, two correlations removed, with ``changes`` (None deletes)."""
    d = load_schema(GAIA).to_dict()
    proj = d["projection"]
    del proj["features"], proj["parallax_pmra_corr"], proj["parallax_pmdec_corr"]
    for k, v in changes.items():
        if v is None:
            proj.pop(k, None)
        else:
            proj[k] = v
    return d


def test_contract_true_features_and_observed_values():
    s = load_schema(_schema())
    assert s.features == ("U", "V", "W") and s.n_features == 3 and s.units == ("km/s",) * 3
    assert s.observed == ("v_alpha", "v_delta") and s.n_observed == 2
    assert s.projection.frame == "galactic" and s.columns == () and s.noise == ()
    assert s.required_columns() == [
        "source_id",
        "ra",
        "dec",
        "parallax",
        "pmra",
        "pmdec",
        "pmra_error",
        "pmdec_error",
        "parallax_error",
        "pmra_pmdec_corr",
    ]
    assert s.noise_columns() == (
        ["parallax_error", "pmra_error", "pmdec_error"],
        ["pmra_pmdec_corr"],
    )
    icrs = load_schema(_schema(frame="icrs"))
    assert icrs.features == ("vx", "vy", "vz")
    named = load_schema(_schema(features=["a", "b", "c"], observed=["x1", "x2"]))
    assert named.features == ("a", "b", "c") and named.observed == ("x1", "x2")
    plain = load_schema("gaia_dr3")  # without a projection nothing changes
    assert plain.projection is None and plain.observed == plain.features and plain.n_observed == 7


def test_round_trip_and_packaged_hipparcos_schema():
    s = load_schema(_schema())
    assert schema_from_dict(s.to_dict()) == s
    assert {"hipparcos_tangential_velocity", GAIA} <= set(packaged_schemas())
    gaia = load_schema(GAIA)
    assert schema_from_dict(gaia.to_dict()) == gaia and gaia.features == ("U", "V", "W")
    hip = load_schema("hipparcos_tangential_velocity")
    assert schema_from_dict(hip.to_dict()) == hip
    assert hip.id_column == "HIP" and hip.projection.angle_unit == "rad"
    # only the trailing (Plx, pmRA, pmDE) block of the weight matrix is read
    assert hip.projection.weight_columns() == ("UW6", "UW9", "UW10", "UW13", "UW14", "UW15")
    d = hip.to_dict()
    del d["projection"]["parallax_error"]
    assert load_schema(d).projection.weight_columns() == ("UW10", "UW14", "UW15")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "radial"}, "'kind' must be one of"),
        ({"frame": "fk4"}, "'frame' must be one of"),
        ({"angle_unit": None}, "'angle_unit' is required"),
        ({"angle_unit": "hourangle"}, "angle_unit 'hourangle' is not one of"),
        ({"pm_unit": "km/s"}, "pm_unit 'km/s' is not one of"),
        ({"unit": "pc/Myr"}, "'unit' must be 'km/s'"),
        ({"pmdec": None}, "'pmdec' (a column name) is required"),
        ({"pmra_error": ""}, "'pmra_error' must be a column name"),
        ({"features": ["U", "V"]}, "'features' must be a list of 3"),
        ({"features": ["U", "u", "W"]}, "'features' must be a list of 3 different"),
        ({"observed": ["U", "x"]}, "must not share names"),
        ({"parallax_error": None, "parallax_pmra_corr": "c"}, "need 'parallax_error'"),
        ({"weight_matrix": ["UW1"] * 15}, "correlation columns or 'weight_matrix', not both"),
        ({"pmra_pmdec_corr": None, "weight_matrix": ["UW1"]}, "must list the 15 columns"),
        ({"parallax_err": "e"}, "unknown key(s) ['parallax_err']"),
    ],
)
def test_malformed_projection_names_the_key(changes, message):
    with pytest.raises(SchemaError) as err:
        load_schema(_schema(**changes))
    assert message in str(err.value) and "[projection]" in str(err.value)


def test_projection_excludes_feature_tables():
    d = _schema()
    d["feature"] = [{"name": "ra", "error": "ra_error"}]
    with pytest.raises(SchemaError, match=r"takes no \[\[feature\]\]"):
        load_schema(d)

"""Hit features: scaling, derived geometry (eta finite on the beam axis), per-feature missing masks."""

import numpy as np
import pytest

from muonreg.data.features import HitFeatures, derived_features
from muonreg.data.schema import HIT_FEATURES

COLS = list(HIT_FEATURES)


def _hits(rows: list[dict]) -> np.ndarray:
    out = np.ones((len(rows), len(COLS)), dtype=np.float32)
    for i, row in enumerate(rows):
        for name, value in row.items():
            out[i, COLS.index(name)] = value
    return out


def test_eta_is_finite_on_the_beam_axis_and_matches_definition():
    x = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 3.0])
    y = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 4.0])
    z = np.array([5.0, -5.0, 0.0, 0.0, np.sinh(1.0), -5.0])
    d = derived_features(x, y, z)
    assert np.isfinite(d["eta"]).all() and np.isfinite(d["theta"]).all()
    np.testing.assert_allclose(d["theta"][:2], [0.0, np.pi], atol=1e-6)  # at the origin only finite
    assert d["eta"][0] > 10 and d["eta"][1] < -10 and d["eta"][2] == 0
    # away from the axis: eta = -ln tan(theta/2)
    reference = -np.log(np.tan(d["theta"][3:] / 2))
    np.testing.assert_allclose(d["eta"][3:], reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d["eta"][3:5], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(d["r"][5], 5.0) and np.testing.assert_allclose(d["s"][5], np.sqrt(50))
    np.testing.assert_allclose(d["phi"][5], np.arctan2(4, 3))


def test_scaling_and_derived_values_in_metres():
    features = HitFeatures(
        ["spacePoint_globEdgeLowZ", "spacePoint_time", "spacePoint_driftR", "r", "eta"], COLS
    )
    assert features.size == 5  # input size is derived from the list
    hits = _hits(
        [
            {
                "spacePoint_globEdgeLowX": 3000.0,
                "spacePoint_globEdgeLowY": 4000.0,
                "spacePoint_globEdgeLowZ": 0.0,
                "spacePoint_time": 500.0,
                "spacePoint_driftR": 7.5,
            }
        ]
    )
    x, valid = features(hits)
    np.testing.assert_allclose(x[0], [0.0, 5e-3, 7.5, 5.0, 0.0], atol=1e-7)
    assert valid.all()


def test_missing_values_are_masked_per_feature_and_per_hit():
    names = ["spacePoint_driftR", "spacePoint_time", "spacePoint_covXX", "spacePoint_layer", "r", "eta"]
    features = HitFeatures(names, COLS)
    hits = _hits(
        [
            {"spacePoint_driftR": np.nan, "spacePoint_layer": 3.0},  # strip hit: no drift radius
            {"spacePoint_time": -999.0, "spacePoint_covXX": np.inf, "spacePoint_driftR": 2.0},
            {"spacePoint_globEdgeLowZ": np.nan, "spacePoint_driftR": 4.0},  # z missing: r fine, eta not
            {},
        ]
    )
    x, valid = features(hits)
    assert np.isfinite(x).all() and not (np.abs(x) > 100).any()  # no NaN, inf or sentinel survives
    expected_valid = np.array(
        [
            [False, True, True, True, True, True],
            [True, False, False, True, True, True],
            [True, True, True, True, True, False],
            [True, True, True, True, True, True],
        ]
    )
    np.testing.assert_array_equal(valid, expected_valid)
    assert (x[~valid] == 0).all()
    assert x[0, 3] == 3.0 and x[1, 0] == 2.0 and x[2, 0] == 4.0  # the hit's other features are kept
    np.testing.assert_allclose(x[2, 4], np.hypot(1e-3, 1e-3), rtol=1e-6)


def test_bad_feature_lists_are_rejected_with_names():
    with pytest.raises(ValueError, match=r"unknown hit feature\(s\) \['etaa'\]"):
        HitFeatures(["r", "etaa"], COLS)
    with pytest.raises(ValueError, match=r"repeats \['r'\]"):
        HitFeatures(["r", "r"], COLS)
    with pytest.raises(ValueError, match="derived features need"):
        HitFeatures(["eta"], [c for c in COLS if c != "spacePoint_globEdgeLowZ"])
    with pytest.raises(ValueError, match="empty"):
        HitFeatures([], COLS)

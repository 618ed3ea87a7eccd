"""The detector simulator: statistics, per-technology columns, cuts, bending physics, determinism, CLI."""

import hashlib

import numpy as np
import pytest

from muonreg.data import detector as det
from muonreg.data.format import DatasetReader
from muonreg.data.schema import HIT_FEATURES, Technology
from muonreg.data.simulate import (
    SimulationConfig,
    generate_muons,
    main,
    simulate_events,
    write_simulated_dataset,
)

COL = {name: i for i, name in enumerate(HIT_FEATURES)}


@pytest.fixture(scope="module")
def sample():
    hits, tracks = simulate_events(1500, seed=7)
    return hits, tracks, np.concatenate(hits)


def test_hits_per_muon_noise_fraction_and_multiplicity(sample):
    hits, tracks, rows = sample
    n_muons = sum(len(t) for t in tracks)
    link = rows[:, COL["spacePoint_truthLink"]]
    assert 20 <= (link >= 0).sum() / n_muons <= 35
    assert 0.35 <= (link < 0).mean() <= 0.6
    assert 70 <= np.mean([len(h) for h in hits]) <= 110


def test_columns_are_meaningful_per_technology(sample):
    _, _, rows = sample
    tech = rows[:, COL["spacePoint_technology"]]
    assert set(np.unique(tech)) <= {Technology.MDT, Technology.RPC, Technology.TGC}
    mdt = tech == Technology.MDT
    drift = rows[:, COL["spacePoint_driftR"]]
    assert np.isnan(drift[~mdt]).all() and not np.isnan(drift[mdt]).any()
    assert drift[mdt].min() >= 0 and drift[mdt].max() <= det.TUBE_RADIUS
    others = np.delete(rows, COL["spacePoint_driftR"], axis=1)
    assert np.isfinite(others).all()  # every other column is measured for every hit
    assert (rows[:, COL["spacePoint_covXX"]] > 0).all() and (rows[:, COL["spacePoint_covYY"]] > 0).all()
    phi = rows[:, COL["spacePoint_stationPhi"]]
    assert phi.min() >= 1 and phi.max() <= 8
    assert set(np.unique(rows[:, COL["spacePoint_stationIndex"]])) <= {s.index for s in det.STATIONS}
    r = np.hypot(rows[:, COL["spacePoint_globEdgeLowX"]], rows[:, COL["spacePoint_globEdgeLowY"]])
    assert r.max() < 15000 and np.abs(rows[:, COL["spacePoint_globEdgeLowZ"]]).max() < 25000


def test_cuts_and_limits_hold(sample):
    hits, tracks, _ = sample
    for h, t in zip(hits, tracks, strict=True):
        assert 1 <= len(t) <= 2 and len(h) <= 600
        link = h[:, COL["spacePoint_truthLink"]]
        assert set(np.unique(link)) <= set(range(-1, len(t)))
        for k in range(len(t)):
            assert (link == k).sum() >= 3
    all_tracks = np.concatenate(tracks)
    assert all_tracks[:, 0].min() >= 5 and np.abs(all_tracks[:, 1]).max() <= 2.7
    assert set(np.unique(all_tracks[:, 3])) == {-1.0, 1.0}


def _sagitta(pt: float, q: float, eta: float = 0.0) -> float:
    """Signed deviation at BM from the straight line through the BI and BO crossings (no scattering)."""
    p = pt * np.cosh(eta)
    rho, z, _ = det.propagate(
        np.zeros(1), np.zeros(1), np.array([np.arctan(np.sinh(eta))]), np.array([q / p])
    )
    zi, zm, zo = (np.interp(r, rho[0], z[0]) for r in (4950.0, 7100.0, 9500.0))
    return zm - (zi + (zo - zi) * (7100 - 4950) / (9500 - 4950))


def test_charge_flips_the_bending_and_sagitta_scales_as_one_over_pt():
    plus, minus = _sagitta(20, +1), _sagitta(20, -1)
    assert plus < 0 < minus and plus == pytest.approx(-minus, rel=1e-9)  # mirror images at eta = 0
    assert _sagitta(20, 1, eta=0.5) < 0 < _sagitta(20, -1, eta=0.5)
    ratio = _sagitta(20, 1) / _sagitta(40, 1)
    assert ratio == pytest.approx(2.0, rel=0.02)
    # DESIGN anchor: a few cm at 10 GeV, a few mm at 100 GeV in the barrel
    assert 10 < abs(_sagitta(10, 1)) < 60 and 1 < abs(_sagitta(100, 1)) < 6


def test_solenoid_rotation_follows_charge():
    cfg = SimulationConfig(calo_scattering=0)
    m = generate_muons(np.random.default_rng(1), 400, cfg)
    kick = np.angle(np.exp(1j * (m.phi_ms - m.phi)))
    np.testing.assert_allclose(kick, -m.q * det.SOLENOID_PHI_KICK / m.pt, atol=1e-9)


def test_same_seed_same_output_different_seed_different():
    a, b, c = simulate_events(50, 3), simulate_events(50, 3), simulate_events(50, 4)
    for x, y in zip(a[0], b[0], strict=True):
        np.testing.assert_array_equal(x, y)
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a[0], c[0], strict=True))


def _digest(path) -> str:
    return hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())
    ).hexdigest()


def test_written_dataset_is_byte_reproducible_and_readable(tmp_path):
    one = write_simulated_dataset(tmp_path / "a", 300, seed=5, files=2, progress=False)
    two = write_simulated_dataset(tmp_path / "b", 300, seed=5, files=2, progress=False)
    assert _digest(one) == _digest(two)
    reader = DatasetReader(one)
    assert len(reader) == 300 and reader.hit_features == list(HIT_FEATURES)
    event = reader.read(299)
    assert event.hits.shape[1] == 20 and 1 <= len(event.tracks) <= 2


def test_cli_writes_a_dataset(tmp_path, capsys):
    main(["--events", "40", "--out", str(tmp_path / "cli"), "--seed", "2", "--uncompressed"])
    assert str(tmp_path / "cli") in capsys.readouterr().out
    reader = DatasetReader(tmp_path / "cli")
    assert len(reader) == 40 and reader.metadata["processing_parameters"]["seed"] == 2
    with pytest.raises(SystemExit):
        main(["--events", "10"])


def test_high_multiplicity_preset():
    hits, _ = simulate_events(600, seed=8, config=SimulationConfig(multiplicity="high"))
    counts = np.array([len(h) for h in hits])
    assert counts.max() <= 600 and counts.min() >= 30
    assert 330 * 0.85 <= counts.mean() <= 330 * 1.15


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="multiplicity='huge'"):
        SimulationConfig(multiplicity="huge")
    with pytest.raises(ValueError, match="pt_spectrum"):
        SimulationConfig(pt_spectrum="steep")

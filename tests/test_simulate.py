"""The detector simulator: statistics, per-technology columns, cuts, bending physics, determinism, CLI."""

import hashlib

import numpy as np
import pytest

from muonreg import detector as det
from muonreg.data.format import DatasetReader
from muonreg.data.schema import HIT_FEATURES, Technology
from muonreg.data.simulate import (
    Alignment,
    SimulationConfig,
    energy_loss,
    generate_muons,
    main,
    readout_id,
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
    assert (drift[~mdt] == 0).all()  # strips: 0, as the real preparation writes, never NaN
    assert drift[mdt].min() >= 0 and drift[mdt].max() <= det.TUBE_RADIUS
    assert np.isfinite(rows).all()  # every column is measured for every hit
    assert (rows[:, COL["spacePoint_covXX"]] > 0).all() and (rows[:, COL["spacePoint_covYY"]] > 0).all()
    # MDT precision covariance: the drift-radius resolution, 50-200 um
    assert (
        0.045**2
        < rows[mdt, COL["spacePoint_covXX"]].min()
        < rows[mdt, COL["spacePoint_covXX"]].max()
        < 0.2**2
    )
    phi = rows[:, COL["spacePoint_stationPhi"]]
    assert phi.min() >= 1 and phi.max() <= 16
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


# -- realism: no shortcut a real detector does not give ------------------------------------------
def _tube_t0(rows: np.ndarray) -> np.ndarray:
    centre = [
        (rows[:, COL[f"spacePoint_globEdgeHigh{c}"]] + rows[:, COL[f"spacePoint_globEdgeLow{c}"]]) / 2
        for c in "XYZ"
    ]
    return det.time_of_flight(*centre)


def test_every_mdt_hit_follows_one_r_t_relation(sample):
    """Noise, delta rays and muon hits alike: driftR is the nominal r(t) at time - t0 of the tube."""
    _, _, rows = sample
    mdt = rows[rows[:, COL["spacePoint_technology"]] == Technology.MDT]
    expected = det.drift_radius(mdt[:, COL["spacePoint_time"]] - _tube_t0(mdt))
    np.testing.assert_allclose(mdt[:, COL["spacePoint_driftR"]], expected, atol=2e-3)  # float32 storage
    noise = mdt[:, COL["spacePoint_truthLink"]] < 0
    assert 0.3 < noise.mean() < 0.7


def test_drift_radius_and_time_do_not_separate_noise_from_muon_hits(sample):
    """A classifier on (driftR, time - t0) alone: the best binned likelihood ratio barely beats chance.

    Noise arrives uniformly in time and muon hits uniformly in radius, a real and weak difference
    (AUC 0.6 in theory); drawing radius and time independently for noise gave AUC > 0.9.
    """
    _, _, rows = sample
    mdt = rows[rows[:, COL["spacePoint_technology"]] == Technology.MDT]
    noise = mdt[:, COL["spacePoint_truthLink"]] < 0
    x = np.stack([mdt[:, COL["spacePoint_driftR"]], mdt[:, COL["spacePoint_time"]] - _tube_t0(mdt)], 1)
    half = len(x) // 2
    edges = [np.linspace(0, det.TUBE_RADIUS, 16), np.linspace(-30, det.MAX_DRIFT_TIME + 30, 16)]
    h_noise = np.histogram2d(*x[:half][noise[:half]].T, bins=edges)[0] + 1
    h_muon = np.histogram2d(*x[:half][~noise[:half]].T, bins=edges)[0] + 1
    ratio = h_noise / h_noise.sum() / (h_muon / h_muon.sum())
    i = np.clip(np.digitize(x[half:, 0], edges[0]) - 1, 0, 14)
    j = np.clip(np.digitize(x[half:, 1], edges[1]) - 1, 0, 14)
    score, label = ratio[i, j], noise[half:]
    # AUC: probability that a noise hit scores above a muon hit
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(len(score))
    auc = (ranks[label].mean() - (label.sum() - 1) / 2) / (~label).sum()
    assert 0.5 <= auc < 0.66


def test_energy_loss_grows_with_eta_and_log_p():
    rng = np.random.default_rng(0)
    cfg = SimulationConfig()
    n = 20000

    def median_loss(p: float, eta: float) -> float:
        return float(np.median(energy_loss(rng, np.full(n, p), np.full(n, eta), cfg)))

    central, forward = median_loss(20, 0.0), median_loss(20, 2.5)
    assert 2.5 < central < 3.5 and forward > 1.4 * central  # more calorimeter on the path
    assert median_loss(10, 0.0) < median_loss(100, 0.0) < median_loss(1000, 0.0)  # logarithmic rise
    assert median_loss(1000, 0.0) < 1.5 * median_loss(10, 0.0)
    losses = energy_loss(rng, np.full(n, 50.0), np.zeros(n), cfg)
    assert np.percentile(losses, 99) - np.median(losses) > 2 * (np.median(losses) - np.percentile(losses, 1))


def test_misalignment_is_fixed_per_chamber_and_per_detector():
    one, again, other = Alignment(7, 0.1), Alignment(7, 0.1), Alignment(8, 0.1)
    sector, side, chamber = np.array([3, 3, 4]), np.array([1.0, 1.0, -1.0]), np.array([2, 2, 2])
    offsets = one(1, sector, side, chamber)
    assert offsets[0] == offsets[1] != offsets[2]  # two muons through one chamber see one offset
    np.testing.assert_array_equal(offsets, again(1, sector, side, chamber))
    assert not np.allclose(offsets, other(1, sector, side, chamber))
    assert 0.07 < one.offsets.std() < 0.13


def test_muons_through_one_chamber_share_its_offset():
    """Identical muons in one dataset: identical hits (the offset is the chamber's, not the muon's)."""
    cfg = SimulationConfig(calo_scattering=0, ms_scattering=0, energy_loss_width=0, noise_scale=0)
    shifted = SimulationConfig(**{**cfg.to_dict(), "alignment_seed": 99})

    def first_muon_hits(config: SimulationConfig) -> np.ndarray:
        rng = np.random.default_rng(3)
        m = generate_muons(rng, 1, config)
        m.event[:] = 0
        from muonreg.data.simulate import mdt_hits

        blocks = mdt_hits(
            np.random.default_rng(4),
            m,
            np.zeros(len(m.pt)),
            Alignment(5 if config.alignment_seed is None else config.alignment_seed, config.alignment),
            config,
        )
        rows = np.concatenate([b.rows for b in blocks])
        return rows[np.concatenate([b.truth for b in blocks])]

    same, again, moved = first_muon_hits(cfg), first_muon_hits(cfg), first_muon_hits(shifted)
    np.testing.assert_array_equal(same, again)
    drift = COL["spacePoint_driftR"]
    assert len(same) and (len(same) != len(moved) or not np.allclose(same[:, drift], moved[:, drift]))


def test_field_integral_dips_in_the_barrel_endcap_transition():
    barrel = det.field_integral(np.linspace(0.1, 1.0, 10))
    transition = det.field_integral(np.linspace(1.4, 1.5, 5))
    endcap = det.field_integral(np.linspace(1.8, 2.6, 9))
    assert transition.max() < 0.6 * min(barrel.min(), endcap.min())
    assert barrel.min() > 1.5 and barrel.max() < 6 and endcap.max() < 7.5  # DESIGN: 1.5-5.5 / 1-7.5 T m


def test_each_tube_and_strip_fires_once_per_event(sample):
    """(technology, station index/eta/phi, layer, channel) names one tube or strip: unique in an event."""
    hits, _, _ = sample
    for h in hits[:300]:
        ids = readout_id(h, np.zeros(len(h), dtype=np.int64))
        assert len(np.unique(ids)) == len(ids)
    rows = np.concatenate(hits)
    mdt = rows[rows[:, COL["spacePoint_technology"]] == Technology.MDT]
    # tubes at +z and -z, and in large and small sectors, carry different identifiers
    plus, minus = (
        mdt[mdt[:, COL["spacePoint_globEdgeLowZ"]] > 0],
        mdt[mdt[:, COL["spacePoint_globEdgeLowZ"]] < 0],
    )
    assert (plus[:, COL["spacePoint_stationEta"]] > 0).all() and (
        minus[:, COL["spacePoint_stationEta"]] < 0
    ).all()
    assert mdt[:, COL["spacePoint_channel"]].min() >= 1


def test_missing_values_are_injected_on_request_and_masked_by_the_features():
    from muonreg.data.features import HitFeatures

    hits, _ = simulate_events(200, seed=9, config=SimulationConfig(missing_fraction=0.2))
    rows = np.concatenate(hits)
    blank = ~np.isfinite(rows) | (rows == -999.0)
    assert 0.15 < blank.any(1).mean() < 0.25
    assert (
        not blank[:, COL["spacePoint_truthLink"]].any() and not blank[:, COL["spacePoint_technology"]].any()
    )
    x, valid = HitFeatures(["spacePoint_time", "spacePoint_driftR", "eta"], list(HIT_FEATURES))(rows)
    assert np.isfinite(x).all() and not valid.all() and valid.mean() > 0.9


# -- the files the public reference trains on ----------------------------------------------------
# The value ranges of the reference's own plotting configuration (hepattn atlas_muon h5 plotting
# config, read 2026-11-25), raw units: positions in mm, time in ns, covariances in mm^2.
REFERENCE_RANGES = {
    "spacePoint_globEdgeHighX": (-15000, 15000),
    "spacePoint_globEdgeHighY": (-15000, 15000),
    "spacePoint_globEdgeHighZ": (-25000, 25000),
    "spacePoint_globEdgeLowX": (-15000, 15000),
    "spacePoint_globEdgeLowY": (-15000, 15000),
    "spacePoint_globEdgeLowZ": (-25000, 25000),
    "spacePoint_time": (-1000, 20000),
    "spacePoint_driftR": (0, 15),
    "spacePoint_readOutSide": (-2, 2),
    "spacePoint_covXX": (-1000, 10_000_000),
    "spacePoint_covXY": (-300_000, 300_000),
    "spacePoint_covYX": (-150_000, 150_000),
    "spacePoint_covYY": (0, 1_300_000),
    "spacePoint_channel": (0, 6000),
    "spacePoint_layer": (0, 10),
    "spacePoint_stationPhi": (0, 50),
    "spacePoint_stationEta": (-10, 10),
    "spacePoint_technology": (-1, 10),
    "spacePoint_stationIndex": (-1000, 1000),
    "spacePoint_truthLink": (-1, 8),
}


def test_files_read_the_reference_way_are_finite_and_in_the_reference_ranges(tmp_path):
    """What the public hepattn loader does: metadata column order, `hits[row, :num_hits]`, no NaN."""
    import h5py
    import yaml

    path = write_simulated_dataset(
        tmp_path / "ds", 400, seed=11, files=2, config=SimulationConfig(multiplicity="high"), progress=False
    )
    meta = yaml.safe_load((path / "metadata.yaml").read_text())
    columns = meta["hit_features"]
    assert set(columns) == set(REFERENCE_RANGES)
    file_idx, row_idx = np.load(path / "event_file_indices.npy"), np.load(path / "event_row_indices.npy")
    chunks = meta["event_mapping"]["chunk_summary"]
    seen = 0
    for f_i, row in zip(file_idx, row_idx, strict=True):
        with h5py.File(path / chunks[f_i]["h5_file"]) as f:
            hits = f["hits"][row, : f["num_hits"][row]]
            tracks = f["tracks"][row, : f["num_tracks"][row]]
        assert np.isfinite(hits).all() and np.isfinite(tracks).all()
        for j, name in enumerate(columns):
            lo, hi = REFERENCE_RANGES[name]
            assert lo <= hits[:, j].min() and hits[:, j].max() <= hi, name
        seen += 1
    assert seen == 400

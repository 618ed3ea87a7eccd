"""The least-squares MS-standalone fit: recovers the truth at the expected resolution, reads columns by name."""

import numpy as np
import pytest

from muonreg.data.fit import fit_events, fit_track, fit_tracks
from muonreg.data.format import DatasetReader
from muonreg.data.schema import HIT_FEATURES
from muonreg.data.simulate import SimulationConfig, simulate_events, write_simulated_dataset

INDEX = {name: i for i, name in enumerate(HIT_FEATURES)}
LINK = INDEX["spacePoint_truthLink"]


def _muons(n_events: int, seed: int, config: SimulationConfig):
    hits, tracks = simulate_events(n_events, seed, config)
    muons = [h[h[:, LINK] == k] for h, t in zip(hits, tracks, strict=True) for k in range(len(t))]
    return muons, np.concatenate(tracks)


def test_fit_resolution_near_50_gev_is_atlas_like():
    config = SimulationConfig(pt_min=40, pt_max=60, pt_spectrum="flat_pt")
    muons, truth = _muons(200, 1, config)
    result = fit_tracks(muons, INDEX)
    assert result["ok"].mean() > 0.98
    ok = result["ok"]
    rel = (result["pt"][ok] - truth[ok, 0]) / truth[ok, 0]
    core = np.diff(np.percentile(rel, [15.865, 84.135]))[0] / 2
    assert 0.015 < core < 0.07 and abs(np.median(rel)) < 0.01
    assert (result["q"][ok] == truth[ok, 3]).mean() > 0.98
    assert np.percentile(np.abs(result["eta"][ok] - truth[ok, 1]), 68) < 0.01
    dphi = np.angle(np.exp(1j * (result["phi"][ok] - truth[ok, 2])))
    assert np.percentile(np.abs(dphi), 68) < 0.01


def test_fit_is_exact_without_scattering_or_misalignment():
    config = SimulationConfig(
        calo_scattering=0, ms_scattering=0, energy_loss_width=0, alignment=0, eta_max=1.0
    )
    muons, truth = _muons(60, 2, config)
    result = fit_tracks(muons, INDEX)
    rel = (result["pt"] - truth[:, 0]) / truth[:, 0]
    assert np.percentile(np.abs(rel), 68) < 0.005
    assert (result["q"] == truth[:, 3]).all()
    assert np.median(result["chi2_ndf"]) < 4


def test_too_few_hits_gives_none_and_shuffled_columns_give_the_same_fit():
    muons, _ = _muons(3, 3, SimulationConfig())
    assert fit_track(muons[0][:3], INDEX) is None
    reference = fit_track(muons[0], INDEX)
    perm = np.random.default_rng(0).permutation(len(HIT_FEATURES))
    shuffled_index = {HIT_FEATURES[j]: i for i, j in enumerate(perm)}
    assert fit_track(muons[0][:, perm], shuffled_index) == pytest.approx(reference)


def test_fit_events_reads_a_dataset(tmp_path):
    path = write_simulated_dataset(tmp_path / "ds", 30, seed=4, progress=False)
    reader = DatasetReader(path)
    out = fit_events(reader, range(30))
    n_muons = sum(len(reader.read(i).tracks) for i in range(30))
    assert len(out["pt"]) == n_muons == len(out["pt_true"]) and out["ok"].mean() > 0.9
    assert set(out) >= {
        "event",
        "track",
        "pt",
        "eta",
        "phi",
        "q",
        "pt_true",
        "eta_true",
        "phi_true",
        "q_true",
        "ok",
    }

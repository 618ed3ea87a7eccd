"""The track fit inside the regression task: exact on hand-made tracks, robust, finite, differentiable."""

import numpy as np
import pytest
import torch

from muonreg.data.geometry import GEOMETRY, G, HitGeometry
from muonreg.data.schema import HIT_FEATURES
from muonreg.data.simulate import SimulationConfig, simulate_events
from muonreg.evaluation.metrics import core_width
from muonreg.tasks.track_fit import TrackFit

# A uniform field of 0.3 B = 1 (per GeV, per m): deflection t^2 / 2, so a track u = a + b t + c t^2 / 2
# is a parabola of curvature c = q/p.
LAM, T = np.linspace(0, np.pi / 2, 64), np.linspace(0, 27, 271)
PARABOLA = (LAM, T, np.tile(T**2 / 2, (len(LAM), 1)))


def strips(rho, z, sigma=1e-3):
    """Barrel strips (they measure z at radius rho) in the sector at phi = 0: geometry [1, m, G]."""
    g = torch.zeros(1, len(rho), len(GEOMETRY), dtype=torch.float64)
    g[0, :, G["normal"]], g[0, :, G["z"]] = torch.tensor(rho), torch.tensor(z)
    g[0, :, G["cos_phi_s"]] = g[0, :, G["cos_phi"]] = 1.0
    g[0, :, G["barrel"]] = 1.0
    g[0, :, G["sigma"]] = sigma
    g[0, :, G["station"]] = 4
    return g


def three_points_on(c, b=0.0):
    rho = np.array([5.0, 7.0, 9.0])
    z = (
        b * (rho - rho.mean()) + c * (rho**2 - (rho**2).mean()) / 2
    )  # centred on z = 0: the line is the rho axis
    return rho, z


def test_three_points_on_a_parabola_give_its_curvature_exactly():
    fit = TrackFit(deflection=PARABOLA, model_error=0.0)
    for c in (0.02, -0.005, 0.0):
        rho, z = three_points_on(c)
        out = fit(strips(rho, z), torch.ones(1, 1, 3, dtype=torch.float64))
        assert out["qp"].item() == pytest.approx(c, abs=1e-7)  # the wide priors pull by < 1e-6 of c
        assert out["chi2_ndf"].item() == pytest.approx(0.0, abs=1e-9)


def test_a_hit_of_weight_zero_is_removed():
    fit = TrackFit(deflection=PARABOLA, model_error=0.0)
    rho, z = three_points_on(0.01)
    outlier = strips(np.append(rho, 8.0), np.append(z, 0.5))
    out = fit(outlier, torch.tensor([[[1.0, 1.0, 1.0, 0.0]]], dtype=torch.float64))
    assert out["qp"].item() == pytest.approx(0.01, abs=1e-7) and out["hits"].item() == pytest.approx(3.0)


def test_a_wrongly_assigned_hit_is_down_weighted():
    """Eight points on a track and one 30 sigma off: the robust fit keeps the track."""
    fit = TrackFit(deflection=PARABOLA, model_error=0.0)
    rho = np.linspace(5, 10, 8)
    z = 0.004 * (rho**2 - (rho**2).mean()) / 2
    noisy = np.append(z + np.random.default_rng(0).normal(0, 1e-3, 8), 0.03)
    out = fit(strips(np.append(rho, 7.2), noisy), torch.ones(1, 1, 9, dtype=torch.float64))
    assert out["qp"].item() == pytest.approx(0.004, abs=3e-4) and out["hits"].item() < 8.2


def test_gradients_reach_the_assignment_weights():
    fit = TrackFit(deflection=PARABOLA, model_error=0.0)
    rho = np.linspace(5, 10, 6)
    z = 0.01 * (rho**2 - (rho**2).mean()) / 2 + np.random.default_rng(1).normal(0, 2e-3, 6)
    weights = torch.full((1, 1, 6), 0.8, dtype=torch.float64, requires_grad=True)
    fit(strips(rho, z), weights)["qp"].sum().backward()
    assert torch.isfinite(weights.grad).all() and weights.grad.abs().sum() > 0


@pytest.mark.parametrize("selected", [0, 1, 2])
def test_zero_one_or_two_hits_give_finite_values_and_gradients(selected):
    rho, z = three_points_on(0.01)
    weights = torch.tensor(
        [[[1.0] * selected + [0.0] * (3 - selected)]], dtype=torch.float64, requires_grad=True
    )
    geometry = strips(rho, z)
    out = TrackFit()(geometry, weights)
    assert all(torch.isfinite(v).all() for v in out.values())
    sum(v.sum() for v in out.values()).backward()
    assert torch.isfinite(weights.grad).all()


def test_on_simulated_truth_hits_the_fit_measures_pt_like_the_classical_fit():
    """The linearised fit of each muon's truth hits: a few % in pT from 10 to 100 GeV, the right charge."""
    hits, tracks = simulate_events(300, 5, SimulationConfig(pt_min=10, pt_max=100, pt_spectrum="flat_pt"))
    geometry = HitGeometry(HIT_FEATURES)
    link = HIT_FEATURES.index("spacePoint_truthLink")
    m = max(len(h) for h in hits)
    g = np.zeros((len(hits), m, len(GEOMETRY)), np.float32)
    w = np.zeros((len(hits), 2, m), np.float32)
    truth = np.full((len(hits), 2, 4), np.nan)
    for i, (h, t) in enumerate(zip(hits, tracks, strict=True)):
        x, valid = geometry(h)
        g[i, : len(h)] = x
        for k in range(len(t)):
            w[i, k, : len(h)] = (h[:, link] == k) & valid
        truth[i, : len(t)] = t
    out = TrackFit()(torch.tensor(g), torch.tensor(w))
    ok = ~np.isnan(truth[..., 0])
    qpt, pt, q = out["qpt"].numpy()[ok], truth[..., 0][ok], truth[..., 3][ok]
    rel = (1 / np.abs(qpt) - pt) / pt
    assert core_width(rel) < 0.06 and abs(np.median(rel)) < 0.02
    assert (np.sign(qpt) == q).mean() > 0.99
    assert core_width(out["eta"].numpy()[ok] - truth[..., 1][ok]) < 0.02

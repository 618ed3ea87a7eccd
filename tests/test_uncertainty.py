"""Per-track uncertainties: pulls by hand, the correction's features and bounds, its calibration on
samples of known spread, and that none of it moves the network's predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_tasks import _geometry_batch

from muonreg import detector as det
from muonreg.evaluation.calibration import fit_correction
from muonreg.evaluation.metrics import binned, core_width
from muonreg.evaluation.pulls import PULL_WIDTH_ERROR, has_pulls, pull_metrics, pulls
from muonreg.tasks.uncertainty import PT_EDGES, TrackUncertainty, fit_errors, hat_basis

from conftest import make_model


def _rows(**columns) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}


def test_pulls_by_hand_reconstructed_muons_only_and_phi_the_short_way():
    rows = _rows(
        reco=[1, 1, 0],
        pred_pt=[10.0, 20.0, 50.0],
        pred_q=[1.0, -1.0, 1.0],
        true_pt=[12.5, 25.0, 50.0],
        true_q=[1.0, 1.0, 1.0],  # the second muon's charge is flipped: q/pT goes through 0
        pred_eta=[0.5, -1.0, 0.0],
        true_eta=[0.49, -1.03, 9.0],
        pred_phi=[3.1, 0.0, 0.0],
        true_phi=[-3.1, 0.002, 9.0],
        sigma_qpt=[0.01, 0.03, 1.0],
        sigma_eta=[0.005, 0.01, 1.0],
        sigma_phi=[0.0416, 0.001, 1.0],
    )
    p = pulls(rows)
    np.testing.assert_allclose(p["qpt"], [(0.1 - 0.08) / 0.01, (-0.05 - 0.04) / 0.03])  # 2, -3
    np.testing.assert_allclose(p["eta"], [2.0, 3.0])
    np.testing.assert_allclose(p["phi"], [(6.2 - 2 * math.pi) / 0.0416, -2.0])  # 3.1 - (-3.1) wraps to -0.083
    assert has_pulls(rows) and not has_pulls({k: v for k, v in rows.items() if k != "sigma_eta"})


def test_pull_width_is_the_68_percent_core_with_its_gaussian_error():
    x = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    # percentiles interpolate linearly: 15.865 % of the way over 4 gaps is 0.6346 into the first one
    width = 2 - 4 * 0.15865
    rows = _rows(
        reco=np.ones(5),
        pred_pt=np.full(5, 10.0),
        pred_q=np.ones(5),
        true_pt=np.full(5, 10.0),
        true_q=np.ones(5),
        pred_eta=x,
        true_eta=np.zeros(5),
        pred_phi=np.zeros(5),
        true_phi=-x,
        sigma_qpt=np.ones(5),
        sigma_eta=np.full(5, 0.5),  # pulls 2x
        sigma_phi=np.ones(5),
    )
    m = pull_metrics(rows)
    assert m["eta_pull_width"] == pytest.approx(2 * width) and m["phi_pull_width"] == pytest.approx(width)
    assert m["qpt_pull_width"] == 0.0 and m["pull_muons"] == 5
    assert m["eta_pull_width_err"] == pytest.approx(PULL_WIDTH_ERROR * 2 * width / math.sqrt(5))
    assert m["eta_pull_median"] == 0.0
    empty = pull_metrics({k: v[:0] for k, v in rows.items()})
    assert math.isnan(empty["eta_pull_width"]) and math.isnan(empty["eta_pull_width_err"])
    by_pt = binned(rows, "pt", [5, 10, 20], pull_metrics)  # every muon at 10 GeV: the second bin
    assert by_pt[0]["pull_muons"] == 0 and by_pt[1]["phi_pull_width"] == pytest.approx(width)


def test_the_pull_width_error_is_the_spread_of_core_widths_of_gaussian_samples():
    widths = [core_width(x) for x in np.random.default_rng(0).normal(size=(4000, 200))]
    assert np.mean(widths) == pytest.approx(1.0, abs=0.01)
    assert np.std(widths) == pytest.approx(PULL_WIDTH_ERROR / math.sqrt(200), rel=0.05)


def test_hat_basis_interpolates_between_knots_and_is_flat_beyond():
    knots = torch.tensor([0.0, 1.0, 3.0])
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0, 3.0, 7.0])
    expected = [[1, 0, 0], [1, 0, 0], [0.5, 0.5, 0], [0, 0.5, 0.5], [0, 0, 1], [0, 0, 1]]
    torch.testing.assert_close(hat_basis(x, knots), torch.tensor(expected, dtype=torch.float32))


def test_correction_scales_the_fits_errors_by_pt_and_eta_region_and_stays_finite():
    unc = TrackUncertainty()
    base = torch.tensor([[1e-3, 2e-3, 3e-3]] * 4)
    pt = torch.tensor([math.sqrt(5 * 10), math.sqrt(50 * 100), 1e6, 0.0])  # knots 0 and 3; beyond; pT 0
    eta = torch.tensor([0.0, -1.525, 0.3, 9.0])  # barrel; the second eta knot; barrel; beyond the last
    out = unc(base, pt, eta)
    torch.testing.assert_close(torch.stack(list(out.values()), -1), base)  # no correction yet
    n_pt = len(PT_EDGES) - 1
    with torch.no_grad():
        unc.coefficients[:, 3] = math.log(2.0)  # the 50-100 GeV hat
        unc.coefficients[:, n_pt] = math.log(3.0)  # the transition region's hat
        unc.coefficients[:, n_pt + 1] = math.log(5.0)  # the endcap's
    out = torch.stack(list(unc(base, pt, eta).values()), -1)
    torch.testing.assert_close(out, base * torch.tensor([[1.0], [6.0], [1.0], [5.0]]))
    # zero errors (a track of no hits) and runaway coefficients: bounded, never 0, inf or NaN
    for runaway in (1e4, -1e4):
        with torch.no_grad():
            unc.coefficients.fill_(runaway)
        for base in (torch.zeros(4, 3), torch.full((4, 3), 1e30)):
            wild = torch.stack(list(unc(base, pt, eta).values()), -1)
            assert torch.isfinite(wild).all() and (wild > 0).all() and torch.isfinite(1 / wild).all()


def test_the_base_widens_phi_without_strips_and_takes_eta_from_the_slope():
    t = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    # two tracks: at eta 0 with slope 0, and at eta asinh(1) (cosh sqrt 2) with slope 1 (d lambda = d slope / 2)
    fit = {"eta": t(0.0, math.asinh(1.0)), "slope": t(0.0, 1.0), "slope_sigma": t(1e-3, 2e-3)}
    fit |= {"p": t(1e9, 1e9), "phi_strips": t(0.0, 5.0)}  # no scattering; no strips, five strips
    expected = {"truthMuon_qpt": t(0.01, 0.02), "truthMuon_phi": t(3e-3, 4e-3)}
    base = fit_errors(fit, expected)
    torch.testing.assert_close(base[:, 0], t(0.01, 0.02))
    torch.testing.assert_close(base[:, 1], t(1e-3, math.sqrt(2) * 1e-3))
    sector = det.SECTOR_WIDTH / math.sqrt(12)  # 0.113 rad
    torch.testing.assert_close(
        base[:, 2], t(math.hypot(3e-3, sector), math.hypot(4e-3, math.exp(-7.5) * sector))
    )


def test_a_checkpoint_from_before_the_correction_loads_with_none():
    model = make_model(pooling=["fit"])
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("uncertainty.coefficients")}
    with torch.no_grad():
        model.regression_task.uncertainty.coefficients.fill_(1.0)
    model.load_state_dict(state)
    assert (model.regression_task.uncertainty.coefficients == 0).all()


def test_the_correction_changes_no_prediction_and_training_never_touches_it():
    batch = _geometry_batch(seed=3)
    model = make_model(pooling=["fit"]).eval()
    task = model.regression_task
    assert not any("uncertainty" in name for name, _ in model.named_parameters())
    outputs = model(batch)
    before = task.predict(outputs)
    with torch.no_grad():
        task.uncertainty.coefficients[:, : len(PT_EDGES) - 1] = 0.7  # every pT hat: x e^0.7 at any pT
    after = task.predict(model(batch))
    for key, value in before.items():
        if key.startswith("track_sigma_"):
            torch.testing.assert_close(after[key], value * math.exp(0.7))
        else:
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    assert set(after) >= {"track_sigma_qpt", "track_sigma_eta", "track_sigma_phi"}
    assert all(torch.isfinite(v).all() and (v > 0).all() for k, v in after.items() if "sigma" in k)
    assert make_model(pooling=["mean"]).regression_task.uncertainty is None  # no fit, no sigma


def _gaussian_sample(rng, n, scale_per_bin, outliers=0.0):
    """Residuals of spread base x scale_per_bin[pT bin], the base varying track to track."""
    pt = np.exp(rng.uniform(np.log(5), np.log(200), n))
    bin_ = np.digitize(pt, PT_EDGES[1:-1])
    base = np.exp(rng.normal(size=(n, 3)))
    residual = rng.normal(size=(n, 3)) * base * np.asarray(scale_per_bin)[bin_, None]
    wild = rng.random(n) < outliers
    residual[wild] *= 50  # a flipped charge, a wrongly assigned hit
    features = TrackUncertainty().features(torch.from_numpy(pt), torch.zeros(n, dtype=torch.float64))
    return residual, base, features.numpy(), pt, bin_


@pytest.mark.parametrize("outliers", [0.0, 0.05])
def test_calibration_brings_pull_widths_to_one_in_every_pt_bin(outliers):
    rng = np.random.default_rng(1)
    scale = [0.5, 1.0, 2.0, 3.0, 1.5]
    residual, base, features, pt, _ = _gaussian_sample(rng, 40000, scale, outliers)
    coefficients = fit_correction(residual, base, features, pt)
    check, check_base, check_features, _, check_bin = _gaussian_sample(rng, 40000, scale, outliers)
    pull = check / (check_base * np.exp(check_features @ coefficients.T))
    for j in range(len(scale)):
        widths = [core_width(column) for column in pull[check_bin == j].T]
        np.testing.assert_allclose(widths, 1.0, atol=0.05, err_msg=f"pT bin {j}")
    uncalibrated = [core_width(check[check_bin == 0, k] / check_base[check_bin == 0, k]) for k in range(3)]
    assert max(uncalibrated) < 0.6  # what it corrected


def test_few_muons_leave_the_fits_own_errors():
    rng = np.random.default_rng(2)
    residual, base, features, pt, _ = _gaussian_sample(rng, 20, [2.0] * 5)
    assert (fit_correction(residual, base, features, pt) == 0).all()

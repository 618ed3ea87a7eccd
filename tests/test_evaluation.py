"""Evaluation metrics on hand-computed cases, and the report files."""

import math

import numpy as np
import pytest
import torch

from muonreg.compare import BIN
from muonreg.evaluation.metrics import (
    TrackRecords,
    binned,
    core_width,
    core_width_err,
    fit_rows,
    resolution_metrics,
    summarise,
)
from muonreg.evaluation.report import COMPARISON, FIT, NETWORK, ORACLE, bin_name, summary, write_report
from muonreg.evaluation.same_muons import comparison, lined_up, lost_core_width, on_network_muons


def test_core_width_and_empty_samples():
    x = np.arange(101) / 100  # uniform 0..1: the 15.865 and 84.135 percentiles are exact
    assert core_width(x) == pytest.approx((0.84135 - 0.15865) / 2)
    assert math.isnan(core_width(np.array([]))) and math.isnan(core_width_err(np.array([1.0])))


def test_the_core_widths_bootstrap_error_is_a_quantiles_not_a_gaussian_widths():
    """For a unit Gaussian the half-width of the 16-84 % interval has the asymptotic standard error
    sqrt((2 var(q84) - 2 cov(q16, q84)) / 4) with var = p (1 - p) / (n f^2), cov = p^2 / (n f^2),
    p = 0.1587, f = the density at 1 (0.2420): 0.962 / sqrt(n), where core / sqrt(2n) says 0.707 / sqrt(n)."""
    n = 2000
    x = np.random.default_rng(7).standard_normal(n)
    err = core_width_err(x)
    assert err == pytest.approx(0.962 / np.sqrt(n), rel=0.15)
    assert err > 1.2 * core_width(x) / np.sqrt(2 * n)
    assert core_width_err(x) == err  # a fixed bootstrap seed: the same evaluation, the same error


def test_lost_muons_count_beyond_both_ends_of_the_core():
    x = np.arange(101) / 100
    assert lost_core_width(x) == pytest.approx(core_width(x))
    # 10 lost of 111: 5 below, 5 above; the 15.865 % point of 111 values sits at 0.15865 * 110 = 17.4515,
    # 12.4515 among the measured (0.124515), the 84.135 % point at 92.5485, 87.5485 among them (0.875485)
    assert lost_core_width(np.concatenate([x, [np.nan] * 10])) == pytest.approx((0.875485 - 0.124515) / 2)
    assert lost_core_width(np.concatenate([x, [np.nan] * 60])) == math.inf  # more than 31.7 % lost


def _records() -> TrackRecords:
    """Two events, hand-made: see the expected numbers in the tests."""
    hits = 8
    batch = {
        "hit_valid": torch.tensor([[True] * 7 + [False], [True] * 4 + [False] * 4]),
        "particle_valid": torch.tensor([[True, True], [True, False]]),
        "particle_hit_valid": torch.zeros(2, 2, hits, dtype=torch.bool),
        "particle_truthMuon_pt": torch.tensor([[10.0, 20.0], [50.0, 0.0]]),
        "particle_truthMuon_eta": torch.tensor([[0.5, -1.5], [2.2, 0.0]]),
        "particle_truthMuon_phi": torch.tensor([[3.1, 0.0], [1.0, 0.0]]),
        "particle_truthMuon_q": torch.tensor([[1.0, -1.0], [1.0, 0.0]]),
    }
    batch["particle_hit_valid"][0, 0, :4] = True  # muon A: hits 0-3
    batch["particle_hit_valid"][0, 1, 4:6] = True  # muon B: hits 4, 5
    batch["particle_hit_valid"][1, 0, :2] = True  # muon C: hits 0, 1
    pred_hits = torch.zeros(2, 2, hits, dtype=torch.bool)
    pred_hits[0, 0, :3] = True  # A: efficiency 3/4, purity 1 -> reconstructed
    pred_hits[0, 1, [4, 6]] = True  # B: efficiency 1/2, purity 1/2 -> reconstructed
    pred_hits[1, 0, 2:4] = True  # C: efficiency 0 -> not reconstructed
    preds = {
        "track_valid": torch.tensor([[True, True], [True, True]]),  # event 1's second track is a fake
        "track_hit_valid": pred_hits,
        "track_truthMuon_pt": torch.tensor([[11.0, 18.0], [40.0, 7.0]]),
        "track_truthMuon_eta": torch.tensor([[0.52, -1.5], [2.0, 0.0]]),
        "track_truthMuon_phi": torch.tensor([[-3.1, 0.01], [1.0, 0.0]]),
        "track_truthMuon_q": torch.tensor([[1.0, 1.0], [1.0, 1.0]]),
    }
    batch["event_index"] = torch.tensor([7, 3])
    records = TrackRecords()
    records.update(preds, batch)
    return records


def test_efficiency_fake_rate_hit_efficiency_purity_and_charge_by_hand():
    m = summarise(_records())
    assert m["track_efficiency"] == pytest.approx(2 / 3)
    assert m["fake_rate"] == pytest.approx(2 / 4)  # 4 predicted tracks, 2 reconstruct a muon
    assert m["hit_efficiency"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert m["hit_purity"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert m["charge_accuracy"] == 0.5  # B's charge is wrong
    # reconstructed A and B: relative pT residuals +0.1 and -0.1; the median bias is 0
    assert m["pt_bias"] == pytest.approx(0.0)
    assert m["pt_resolution_rms"] == pytest.approx(0.1)
    # phi wraps around: 3.1 vs -3.1 is 0.083 rad apart, not 6.2
    assert m["phi_resolution_mrad"] < 100


def test_bins_with_no_muons_are_nan_not_errors():
    rows = _records().arrays()
    table = binned(rows, "pt", [5, 15, 30, 100, 200])
    assert [r["muons"] for r in table] == [1, 1, 1, 0] and [r["measured"] for r in table] == [1, 1, 0, 0]
    assert table[0]["track_efficiency"] == 1.0 and table[2]["track_efficiency"] == 0.0
    assert math.isnan(table[3]["track_efficiency"]) and math.isnan(table[3]["pt_resolution"])
    assert table[0]["pt_resolution"] == 0.0  # a single muon
    by_eta = binned(rows, "abs_eta", [0, 1.05, 2.0, 2.7])
    assert [r["muons"] for r in by_eta] == [1, 1, 1]


def _fit_of(
    network: dict[str, np.ndarray], relative_error: np.ndarray, ok: np.ndarray
) -> dict[str, np.ndarray]:
    """A least-squares fit's cached columns (reco.fit.fit_events) for the network's muons, in reverse order."""
    order = np.arange(len(ok))[::-1]
    truth = {f"{f}_true": network[f"true_{f}"][order] for f in ("pt", "eta", "phi", "q")}
    return {
        "event": network["event"][order],
        "track": network["slot"][order],
        "ok": ok[order],
        **truth,
        "pt": truth["pt_true"] * (1 + relative_error[order]),
        "eta": truth["eta_true"],
        "phi": truth["phi_true"],
        "q": truth["q_true"],
    }


def test_the_fit_is_lined_up_with_the_networks_muons_and_measured_on_them():
    network = _records().arrays()  # muons A (event 7, slot 0), B (7, 1) reconstructed; C (3, 0) lost
    fit = fit_rows(_fit_of(network, np.array([0.05, -0.05, 0.01]), np.array([True, True, True])))
    reference = lined_up(fit, network)
    assert list(reference["true_pt"]) == [10.0, 20.0, 50.0]
    same = on_network_muons(reference, network)
    assert list(same["reco"]) == [True, True, False]  # C: the network lost it, so no fit of it is measured
    with pytest.raises(ValueError, match="every muon"):
        lined_up({k: v[:2] for k, v in fit.items()}, network)


def test_network_over_fit_on_the_same_muons_and_with_lost_muons_as_failures_by_hand():
    network = _records().arrays()  # residuals of A and B: +0.1 and -0.1; C lost
    fit = lined_up(
        fit_rows(_fit_of(network, np.array([0.05, -0.05, 0.02]), np.array([True, True, True]))), network
    )
    c = comparison(network, fit)
    # two values a < b have a core of 0.68270 (b - a) / 2: 0.0682 for the network, 0.0341 for the fit
    assert c["paired_muons"] == 2 and c["fit_failed"] == 0 and c["track_efficiency"] == pytest.approx(2 / 3)
    assert c["ratio_pt_resolution"] == pytest.approx(2.0)
    assert c["lost_pt_resolution"] == math.inf  # one of three lost is more than 31.7 %
    assert c["fit_lost_pt_resolution"] == pytest.approx(lost_core_width(np.array([0.05, -0.05, 0.02])))
    failing = lined_up(
        fit_rows(_fit_of(network, np.array([0.05, -0.05, 0.02]), np.array([True, False, True]))), network
    )
    c = comparison(network, failing)
    assert c["paired_muons"] == 1 and c["fit_failed"] == 1  # B: the network's muon the fit lost, counted


def test_fit_rows_and_report_files(tmp_path):
    n = 50
    rng = np.random.default_rng(0)
    pt = rng.uniform(5, 200, n)
    fit = {
        "event": np.arange(n),
        "track": np.zeros(n, int),
        "ok": np.ones(n, bool),
        **{
            f"{f}_true": v
            for f, v in zip(
                ("pt", "eta", "phi", "q"),
                (pt, rng.uniform(-2, 2, n), rng.uniform(-3, 3, n), np.ones(n)),
                strict=True,
            )
        },
    }
    fit.update(
        pt=pt * (1 + 0.03 * rng.standard_normal(n)), eta=fit["eta_true"], phi=fit["phi_true"], q=np.ones(n)
    )
    rows = fit_rows(fit)
    assert resolution_metrics(rows)["track_efficiency"] == 1.0
    network = {**rows, "pred_pt": rows["true_pt"] * (1 + 0.06 * rng.standard_normal(n))}
    network["reco"] = np.arange(n) % 10 != 0  # 5 of 50 lost
    methods = {NETWORK: network, ORACLE: network, FIT: on_network_muons(rows, network)}
    metrics, tables = write_report(tmp_path, methods, [5, 50, 200], [0, 1.05, 2.7], rows)
    assert 0.01 < metrics["fit_pt_resolution"] < 0.06 and metrics["fit_charge_accuracy"] == 1.0
    assert metrics["fit_measured"] == 45 and metrics["fit_track_efficiency"] == 0.9  # the network's muons
    assert metrics["oracle_pt_resolution"] == tables[NETWORK]["all"][0]["pt_resolution"]
    # per pT bin, every method, in the names muonreg.compare reads
    assert metrics["fit_pt_resolution_pt5_50"] == tables[FIT]["pT [GeV]"][0]["pt_resolution"]
    assert metrics["fit_pt_bias_pt50_200"] == tables[FIT]["pT [GeV]"][1]["pt_bias"]
    assert {"pt_resolution_pt5_50", "oracle_charge_accuracy_pt50_200"} <= set(metrics)  # the network's too
    counts = [metrics["muons_pt5_50"], metrics["muons_pt50_200"]]
    assert sum(counts) == n and counts[0] == np.sum(pt < 50)
    assert metrics["paired_muons"] == 45 and metrics["fit_failed"] == 0
    ratio = metrics["ratio_pt_resolution_pt50_200"]
    assert ratio == tables[COMPARISON]["pT [GeV]"][1]["ratio_pt_resolution"] and 1 < ratio < 4
    assert metrics["ratio_pt_resolution_err_pt50_200"] > 0
    assert metrics["ratio_lost_pt_resolution"] > metrics["ratio_pt_resolution"]  # losing muons costs
    assert BIN.match("test/muons_pt5_50") and bin_name(2.5, 5) == "pt2p5_5"
    lines = summary(tables).splitlines()
    assert len(lines) == 1 + 1 + 2 and "least-squares fit" in lines[0] and "x | " in lines[1]
    assert (
        lines[1].endswith(" | 50")
        and f"{tables[COMPARISON]['all'][0]['ratio_pt_resolution']:.2f} ± " in lines[1]
    )
    for name in (
        "resolution.md",
        "resolution.csv",
        "ratio.csv",
        "residuals.png",
        "resolution_vs_pt.png",
        "ratio_vs_pt.png",
        "bias_vs_pt.png",
        "resolution_vs_eta.png",
        "efficiency_vs_pt.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "resolution.md").read_text()
    assert "| least-squares fit | 5-50 |" in text and "| network | 50-200 |" in text
    assert "| network, truth assignment | 5-50 |" in text and "## Network ÷ least-squares fit" in text

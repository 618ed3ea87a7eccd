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
    fit_rows,
    resolution_metrics,
    summarise,
)
from muonreg.evaluation.report import FIT, NETWORK, ORACLE, bin_name, summary, write_report


def test_core_width_and_empty_samples():
    x = np.arange(101) / 100  # uniform 0..1: the 15.865 and 84.135 percentiles are exact
    assert core_width(x) == pytest.approx((0.84135 - 0.15865) / 2)
    assert math.isnan(core_width(np.array([])))


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
    assert [r["muons"] for r in table] == [1, 1, 1, 0]
    assert table[0]["track_efficiency"] == 1.0 and table[2]["track_efficiency"] == 0.0
    assert math.isnan(table[3]["track_efficiency"]) and math.isnan(table[3]["pt_resolution"])
    assert table[0]["pt_resolution"] == 0.0  # a single muon
    by_eta = binned(rows, "abs_eta", [0, 1.05, 2.0, 2.7])
    assert [r["muons"] for r in by_eta] == [1, 1, 1]


def test_fit_rows_and_report_files(tmp_path):
    n = 50
    rng = np.random.default_rng(0)
    pt = rng.uniform(5, 200, n)
    fit = {
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
    network = _records().arrays()
    methods = {NETWORK: network, ORACLE: network, FIT: rows}
    metrics, tables = write_report(tmp_path, methods, [5, 50, 200], [0, 1.05, 2.7])
    assert 0.01 < metrics["fit_pt_resolution"] < 0.06 and metrics["fit_charge_accuracy"] == 1.0
    assert metrics["oracle_pt_resolution"] == tables[NETWORK]["all"][0]["pt_resolution"]
    # per pT bin, every method, in the names muonreg.compare reads
    assert metrics["fit_pt_resolution_pt5_50"] == tables[FIT]["pT [GeV]"][0]["pt_resolution"]
    assert metrics["fit_pt_bias_pt50_200"] == tables[FIT]["pT [GeV]"][1]["pt_bias"]
    assert {"pt_resolution_pt5_50", "oracle_charge_accuracy_pt50_200"} <= set(metrics)  # the network's too
    assert BIN.match("test/pt_resolution_pt5_50") and bin_name(2.5, 5) == "pt2p5_5"
    lines = summary(tables).splitlines()
    assert len(lines) == 1 + 1 + 2 and "least-squares fit" in lines[0] and "x" in lines[1]
    for name in (
        "resolution.md",
        "resolution.csv",
        "residuals.png",
        "resolution_vs_pt.png",
        "bias_vs_pt.png",
        "resolution_vs_eta.png",
        "efficiency_vs_pt.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "resolution.md").read_text()
    assert "| least-squares fit | 5-50 |" in text and "| network | 50-200 |" in text
    assert "| network, truth assignment | 5-50 |" in text

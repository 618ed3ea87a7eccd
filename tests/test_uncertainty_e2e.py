"""A short real training with reconstructed muons (3000 events, 4 epochs: ~2 min on 2 cores): the
uncertainties are calibrated on its validation split, kept in its checkpoint, and its test
evaluation reports finite pull widths in MLflow and in the report."""

from __future__ import annotations

import math

import pytest
import torch

from muonreg.evaluation.calibration import calibrate_uncertainty
from muonreg.trained import load_model
from muonreg.training.setup import build_data, eval_loader, evaluation_sets

from train_cli import client, run_train, runs

pytestmark = pytest.mark.slow
EVENTS = 3000  # the fewest (with 4 epochs of batch 32) after which the network reconstructs muons


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("uncertainty")
    run_train(
        root,
        data_dir,
        f"data.simulation.events={EVENTS}",
        f"data.max_events={EVENTS}",
        "trainer.max_epochs=4",
        "evaluation.validation.events=1000",  # a simulated validation set: not the val split
        "evaluation.fit_reference=false",
        "evaluation.assigned_fit_events=0",
        "evaluation.displays=0",
    )
    (run,) = runs(root)
    (best,) = root.glob("outputs/**/checkpoints/best.pt")
    return root, run, best


def test_a_trained_networks_pulls_are_calibrated_and_reported(trained):
    root, run, _ = trained
    metrics = run.data.metrics
    assert metrics["test/track_efficiency"] > 0.5  # muons to have pulls of
    for field in ("qpt", "eta", "phi"):
        # the fit's own errors are too small for the network (widths 1.2-2); calibrated on validation,
        # the test pulls come out near 1 (~150 muons: a width's statistical error is ~0.08, the
        # calibration's on ~150 validation muons as much)
        assert metrics[f"calibration/{field}_pull_width_fit"] > 1.1
        assert 0.6 < metrics[f"test/{field}_pull_width"] < 1.5, field
        assert math.isfinite(metrics[f"test/{field}_pull_width_pt5_10"])
        assert math.isfinite(metrics[f"test/{field}_pull_median"])
    # calibrated on the validation set (its muons: more per pT bin than the val split's), not the val split
    assert metrics["calibration/muons"] == metrics["validation/pull_muons"] > 0
    artifacts = {a.path for a in client(root).list_artifacts(run.info.run_id, "evaluation")}
    assert {
        f"evaluation/{name}" for name in ("pulls.md", "pulls.csv", "pulls.png", "pull_width_vs_pt.png")
    } <= artifacts


def test_the_checkpoint_keeps_the_calibration_and_calibrating_again_changes_nothing(trained):
    _, _, best = trained
    model, cfg = load_model(best)
    kept = model.regression_task.uncertainty.coefficients.clone()
    assert kept.abs().sum() > 0
    validation = evaluation_sets(cfg, build_data(cfg, progress=False), progress=False)["validation"]
    calibrate_uncertainty(model, eval_loader(cfg, validation, torch.device("cpu")), torch.device("cpu"), None)
    torch.testing.assert_close(model.regression_task.uncertainty.coefficients, kept, rtol=1e-4, atol=1e-4)

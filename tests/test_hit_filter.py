"""The hit filter: its metrics on hand-made scores, the windowed attention, the model's outputs and
gradients, the per-event cuts of `muonreg-prepare filter`, and end to end a real filter training
via train.py, the filter applied, and the tracker trained on what it wrote."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from muonreg.config import ConfigError, project_root, validate
from muonreg.data.format import DatasetReader
from muonreg.data.geometry import GEOMETRY, G
from muonreg.evaluate import evaluate_checkpoint
from muonreg.evaluation.filter_metrics import filter_metrics, roc_auc, roc_curve, threshold_at_efficiency
from muonreg.export import export
from muonreg.filtering import FilterError, Losses, filter_dataset, filter_event
from muonreg.models import HitFilter
from muonreg.models.layers import Attention, WindowedAttention, attendable
from muonreg.predict import predict
from muonreg.tracking.model import stored_events
from muonreg.trained import CheckpointError, load_model

from train_cli import ENV, ROOT, run_train

# Six hits: muons score 0.9, 0.8, 0.6; background 0.7, 0.4, 0.2.
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.2])
LABELS = np.array([1, 1, 0, 1, 0, 0], dtype=bool)


def test_roc_curve_and_auc_on_six_hits():
    background_kept, efficiency, thresholds = roc_curve(SCORES, LABELS)
    np.testing.assert_allclose(background_kept, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(efficiency, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.4, 0.2])
    assert roc_auc(SCORES, LABELS) == pytest.approx(8 / 9)  # 8 of the 9 muon/background pairs ordered
    assert roc_auc(np.array([0.5, 0.5]), np.array([True, False])) == pytest.approx(0.5)  # a tie: one half
    assert math.isnan(roc_auc(SCORES, np.ones(6, bool)))


def test_working_points_on_six_hits():
    m = filter_metrics(SCORES, LABELS, [0.99, 0.6])
    # 0.99 of 3 muon hits needs all 3: cut at 0.6, which also keeps the background hit at 0.7
    assert m["wp0.99/threshold"] == 0.6
    assert m["wp0.99/efficiency"] == 1.0 and m["wp0.99/purity"] == 0.75
    assert m["wp0.99/background_kept"] == pytest.approx(1 / 3) and m["wp0.99/background_rejection"] == 3.0
    # 0.6 needs 2 of 3: cut at 0.8, no background left
    assert m["wp0.6/threshold"] == 0.8 and m["wp0.6/efficiency"] == pytest.approx(2 / 3)
    assert m["wp0.6/purity"] == 1.0 and m["wp0.6/background_kept"] == 0.0
    assert m["wp0.6/background_rejection"] == math.inf
    # a region is measured at the given cuts, not at its own
    region = filter_metrics(SCORES[3:], LABELS[3:], [0.99], {0.99: 0.8})
    assert region["wp0.99/efficiency"] == 0.0 and region["wp0.99/background_kept"] == 0.0


def test_threshold_at_efficiency_edges():
    muons = np.array([0.3, 0.1, 0.2])
    assert threshold_at_efficiency(muons, 1.0) == 0.1
    assert threshold_at_efficiency(muons, 2 / 3) == 0.2  # 2/3 * 3 is 2.0000000000000004 in floats
    assert threshold_at_efficiency(muons, 0.01) == 0.3
    with pytest.raises(ValueError, match="working point"):
        threshold_at_efficiency(muons, 0.0)


def _attentions(window: int) -> tuple[WindowedAttention, Attention]:
    torch.manual_seed(0)
    windowed = WindowedAttention(16, 4, window)
    full = Attention(16, 4)
    full.load_state_dict(windowed.state_dict())
    return windowed, full


def test_windowed_attention_is_full_attention_when_the_window_covers_the_event():
    windowed, full = _attentions(window=32)
    x = torch.randn(2, 25, 16)
    valid = torch.ones(2, 25, dtype=torch.bool)
    valid[1, 17:] = False
    mask = attendable(valid.unsqueeze(1), valid)
    torch.testing.assert_close(windowed(x, x, mask), full(x, x, mask), atol=1e-6, rtol=1e-5)


def test_windowed_attention_sees_exactly_its_block_and_the_two_beside_it():
    windowed, full = _attentions(window=4)
    m = 18  # blocks 0-3, 4-7, 8-11, 12-15, 16-17
    x = torch.randn(1, m, 16)
    valid = torch.ones(1, m, dtype=torch.bool)
    block = torch.arange(m) // 4
    band = (block[:, None] - block[None, :]).abs() <= 1  # [queries, keys]
    expected = full(x, x, band.unsqueeze(0))
    torch.testing.assert_close(windowed(x, x, valid.unsqueeze(1)), expected, atol=1e-6, rtol=1e-5)


def _padded_batch(features: int = 6, hits: int = 40) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    hit_valid = torch.ones(2, hits, dtype=torch.bool)
    hit_valid[1, 25:] = False  # the second event is shorter: padding
    muon = torch.zeros(2, 2, hits, dtype=torch.bool)
    muon[0, 0, :5], muon[0, 1, 10:14], muon[1, 0, 3:9] = True, True, True
    geometry = torch.zeros(2, hits, len(GEOMETRY))
    phi_s = torch.randint(0, 3, (2, hits)) * 2 * math.pi / 16
    geometry[..., G["cos_phi_s"]], geometry[..., G["sin_phi_s"]] = phi_s.cos(), phi_s.sin()
    geometry[..., G["normal"]] = 5 + 5 * torch.rand(2, hits)
    geometry[..., G["z"]] = 10 * torch.randn(2, hits)
    geometry[..., G["mdt"]] = (torch.rand(2, hits) < 0.8).float()
    geometry[..., G["barrel"]] = 1.0
    geometry[..., G["time_residual"]] = 100 * torch.rand(2, hits)
    return {
        "hit_x": torch.randn(2, hits, features) * hit_valid.unsqueeze(-1),
        "hit_x_valid": hit_valid.unsqueeze(-1).expand(-1, -1, features).clone(),
        "hit_valid": hit_valid,
        "hit_geometry": geometry * hit_valid[..., None],
        "hit_geometry_valid": hit_valid.clone(),
        "particle_hit_valid": muon,
    }


@pytest.mark.parametrize(
    "design",
    [
        {"layers": 2, "neighbours": 4},  # the detector's neighbourhoods
        {"layers": 2, "neighbours": 4, "attention_layers": 1, "window": 8},  # and attention beside
        {
            "layers": 0,
            "order": "phi",
            "sort_index": 2,
            "attention_layers": 2,
            "window": 8,
        },  # the earlier design
    ],
)
def test_hit_filter_outputs_and_gradients_on_a_padded_batch(design):
    batch = _padded_batch()
    model = HitFilter(6, dim=16, heads=4, **design)
    outputs = model(batch)
    assert outputs["hit_filter_logit"].shape == (2, 40)
    assert torch.isfinite(outputs["hit_filter_logit"]).all()
    losses = model.loss(outputs, batch)
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads[-4:])  # the head and the last layer learn
    assert sum(float(g.abs().sum()) for g in grads) > 0

    # padding changes nothing for real hits; hits in another order give the same scores, reordered
    with torch.no_grad():
        pad = ~batch["hit_valid"].unsqueeze(-1)
        noisy = {
            **batch,
            "hit_x": batch["hit_x"] + 5.0 * pad,
            "hit_geometry": batch["hit_geometry"] + 3.0 * pad,
        }
        torch.testing.assert_close(
            model(noisy)["hit_filter_logit"][1, :25], outputs["hit_filter_logit"][1, :25]
        )
        perm = torch.randperm(40)
        shuffled = {k: v[:, :, perm] if k == "particle_hit_valid" else v[:, perm] for k, v in batch.items()}
        torch.testing.assert_close(
            model(shuffled)["hit_filter_logit"][0], outputs["hit_filter_logit"][0, perm], atol=1e-5, rtol=1e-5
        )


def _event(links: list[int], n_tracks: int) -> tuple[np.ndarray, np.ndarray]:
    hits = np.zeros((len(links), 20), dtype=np.float32)
    hits[:, 0] = np.arange(len(links))  # a hit's identity
    hits[:, 19] = links
    return hits, np.arange(n_tracks * 4, dtype=np.float32).reshape(n_tracks, 4)


def test_filter_event_keeps_cuts_and_renumbers():
    hits, tracks = _event([-1, 0, 0, 1, 1, 1, 2, 2, 2, -1], n_tracks=3)
    kept = np.array([1, 1, 0, 1, 1, 1, 1, 1, 1, 0], dtype=bool)
    losses = Losses()
    out_hits, out_tracks = filter_event(hits, tracks, kept, 19, 3, 600, 2, losses)
    # muon 0 keeps 1 hit (< 3): removed with its hit; muons 1, 2 become 0, 1
    np.testing.assert_array_equal(out_hits[:, 0], [0, 3, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(out_hits[:, 19], [-1, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(out_tracks, tracks[1:])
    c = losses.summary()
    assert c["muons_lost_too_few_hits"] == 1 and c["muon_hits_lost_by_cut"] == 1
    assert c["background_hits_in"] == 2 and c["background_hits_kept_by_cut"] == 1
    # too many muons, too many hits, no muon: dropped and counted
    assert filter_event(hits, tracks, np.ones(10, bool), 19, 2, 600, 2, losses) is None
    assert filter_event(hits, tracks, kept, 19, 3, 6, 2, losses) is None
    assert filter_event(hits, tracks, np.zeros(10, bool), 19, 3, 600, 2, losses) is None
    c = losses.summary()
    assert (
        c["events_dropped_too_many_tracks"],
        c["events_dropped_too_many_hits"],
        c["events_dropped_no_muon"],
    ) == (
        1,
        1,
        1,
    )
    assert c["events_in"] == 4 and c["events_written"] == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.order=phi model.sort_by=rho", r"model\.sort_by='rho' must be one of the input features"),
        ("model.order=eta", r"model\.order='eta' must be one of \['detector', 'phi'\]"),
        ("model.layers=0", r"model\.layers=0 the filter needs neighbourhood layers"),
        ("model.window=0", r"model\.window=0 must be a positive number of hits"),
        ("model.working_points=[1.5]", r"model\.working_points=\[1\.5\] must be muon-hit efficiencies"),
    ],
)
def test_bad_filter_settings_fail_naming_the_key(override, message):
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=hit_filter", *override.split()])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_filter_refuses_an_existing_output(tmp_path):
    with pytest.raises(FilterError, match="already exists"):
        filter_dataset(tmp_path / "best.pt", tmp_path, tmp_path)


# -- end to end: train the filter, apply it, train the tracker on its output -----------------------

PILEUP = ("+experiment=hit_filter", "data.simulation.events=100", "data.simulation.pileup=20")


@pytest.fixture(scope="module")
def filter_run(tmp_path_factory) -> tuple[Path, mlflow.entities.Run]:
    """One real filter training via train.py on smoke-sized pile-up events (~800 hits each)."""
    root, data = tmp_path_factory.mktemp("filter"), tmp_path_factory.mktemp("filter-data")
    run_train(
        root,
        data,
        *PILEUP,
        "data.max_events=null",
        "trainer.max_epochs=3",
        "trainer.batch_size=4",
        "tracking.experiment=muonreg",
    )
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs(client.get_experiment_by_name("muonreg").experiment_id)
    return root, run


@pytest.mark.slow
def test_filter_training_logs_its_metrics_to_mlflow(filter_run):
    root, run = filter_run
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert run.info.status == "FINISHED"
    dataset = DatasetReader(run.data.tags["dataset"])
    hits = np.concatenate([dataset.read(i).hits[:, 19] for i in range(len(dataset))])
    assert len(hits) / len(dataset) > 300 and (hits >= 0).mean() < 0.15  # many hits, few of muons
    steps = [m.value for m in client.get_metric_history(run.info.run_id, "train/step_loss")]
    assert len(steps) >= 10 and np.mean(steps[-3:]) < 0.8 * np.mean(steps[:3])  # the loss drops
    metrics = run.data.metrics
    assert 0.5 < metrics["test/auc"] <= 1 and "val/auc" in metrics
    stored = load_model(_checkpoint(run), kind=HitFilter)[0].stored_cuts()
    for wp in (0.99, 0.995):  # the test split is measured at the cuts set on validation and stored
        name = f"wp{wp:g}"
        assert metrics[f"test/{name}/threshold"] == pytest.approx(stored[wp])
        assert abs(metrics[f"test/{name}/efficiency"] - wp) < 0.05 and 0 < metrics[f"test/{name}/purity"] <= 1
        assert (
            0 <= metrics[f"test/{name}/muons_lost"] <= 1 and metrics[f"test/{name}/hits_kept_per_event"] > 0
        )
    assert metrics["test/wp0.995/threshold"] <= metrics["test/wp0.99/threshold"]
    assert 0.5 < metrics["test/road/auc"] <= 1 and "test/road/layers8/background_rejection" in metrics
    assert {"test/MDT/auc", "test/abseta0_1p05/wp0.99/efficiency"} <= set(metrics)
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/hit_filter.md", "evaluation/roc.png", "evaluation/scores.png"} <= artifacts
    assert run.data.params["model.kind"] == "hit_filter"
    assert "model/MLmodel" in {f.path for f in client.list_artifacts(run.info.run_id, "model")}


@pytest.mark.slow
def _checkpoint(run) -> Path:
    return Path(run.data.tags["muonreg.run_dir"]) / "checkpoints" / "best.pt"


def test_a_filter_checkpoint_re_evaluates_and_is_refused_by_tracker_tools(filter_run, tmp_path):
    _, run = filter_run
    checkpoint = _checkpoint(run)
    metrics, report = evaluate_checkpoint(checkpoint, "test", tmp_path / "report")
    assert metrics["test/auc"] == pytest.approx(run.data.metrics["test/auc"], abs=1e-6)
    assert (report / "hit_filter.md").is_file()
    with pytest.raises(CheckpointError, match=r"hit filter .* needs a MaskFormer"):
        load_model(checkpoint)


@pytest.mark.slow
def test_filter_output_reads_back_and_trains_the_tracker(filter_run, tmp_path):
    _, run = filter_run
    checkpoint = Path(run.data.tags["muonreg.run_dir"]) / "checkpoints" / "best.pt"
    source, out = Path(run.data.tags["dataset"]), tmp_path / "tracking"
    cmd = [sys.executable, "-m", "muonreg.prepare", "filter", "--checkpoint", str(checkpoint)]
    cmd += ["--input", str(source), "--output", str(out), "--working-point", "0.99", "--max-hits", "450"]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    meta = yaml.safe_load((out / "metadata.yaml").read_text())["processing_parameters"]["hit_filter"]
    assert meta["working_point"] == 0.99 and meta["checkpoint"] == str(checkpoint.resolve())
    assert meta["cut_from"] == "stored"
    assert meta["threshold"] == pytest.approx(load_model(checkpoint, kind=HitFilter)[0].stored_cuts()[0.99])
    losses, original = meta["losses"], DatasetReader(source)
    assert losses["muon_hit_efficiency"] > 0.9 and losses["events_in"] == len(original)
    dropped = sum(losses[f"events_dropped_{k}"] for k in ("no_muon", "too_many_tracks", "too_many_hits"))
    assert losses["events_written"] + dropped == len(original) and losses["events_written"] > 0

    reader = DatasetReader(out)
    assert len(reader) == losses["events_written"]
    by_number = {original.read(i).event_number: i for i in range(len(original))}
    total_hits = 0
    for i in range(len(reader)):
        event = reader.read(i)
        links = event.hits[:, 19].astype(int)
        total_hits += len(links)
        assert len(links) <= 450 and 1 <= len(event.tracks) <= 2
        counts = np.bincount(links[links >= 0], minlength=len(event.tracks))
        assert len(counts) == len(event.tracks) and counts.min() >= 3  # renumbered 0..n-1, each muon kept
        before = original.read(by_number[event.event_number])
        kept_rows = {tuple(row[:19]) for row in event.hits}
        assert kept_rows <= {tuple(row[:19]) for row in before.hits}  # only hits of that event
        for new, track in enumerate(event.tracks):  # each renumbered link points at its own muon
            (old,) = np.flatnonzero((before.tracks == track).all(1))
            old_hits = {tuple(r[:19]) for r in before.hits[before.hits[:, 19] == old]}
            assert {tuple(r[:19]) for r in event.hits[links == new]} <= old_hits
    assert total_hits == losses["hits_written"]

    tracker_root = tmp_path / "tracker"
    run_train(tracker_root, tmp_path / "tracker-data", f"data.path={out}", "evaluation.assigned_fit_events=0")
    client = mlflow.MlflowClient(f"sqlite:///{tracker_root}/mlflow.db")
    (tracker,) = client.search_runs(client.get_experiment_by_name("muonreg").experiment_id)
    assert tracker.info.status == "FINISHED" and tracker.data.tags["dataset"] == str(out)
    assert "test/track_efficiency" in tracker.data.metrics


@pytest.mark.slow
def test_the_stored_cut_is_the_one_applied(filter_run, tmp_path):
    _, run = filter_run
    checkpoint, source = _checkpoint(run), Path(run.data.tags["dataset"])
    cut = load_model(checkpoint, kind=HitFilter)[0].stored_cuts()[0.995]
    common = dict(max_hits=450, compression=None, progress=False)
    stored = filter_dataset(checkpoint, source, tmp_path / "stored", working_point=0.995, **common)
    explicit = filter_dataset(checkpoint, source, tmp_path / "explicit", threshold=cut, **common)
    assert stored["hit_filter"]["cut_from"] == "stored" and explicit["hit_filter"]["cut_from"] == "threshold"
    assert stored["hit_filter"]["losses"] == explicit["hit_filter"]["losses"]
    a, b = DatasetReader(tmp_path / "stored"), DatasetReader(tmp_path / "explicit")
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        np.testing.assert_array_equal(a.read(i).hits, b.read(i).hits)
    # on request, the cut is set on the input's own truth (the earlier behaviour), and says so
    truth = filter_dataset(
        checkpoint, source, tmp_path / "truth", working_point=0.99, cut_from_input_truth=True, **common
    )
    assert (
        truth["hit_filter"]["cut_from"] == "input truth"
        and truth["hit_filter"]["losses"]["muon_hit_efficiency"] >= 0.99
    )
    # impossible settings fail before any hit is scored
    for bad, message in (({"working_point": 1.5}, "--working-point 1.5"), ({"working_point": 0.9}, r"stores cuts for \[0.99, 0.995\] only"),
                         ({"threshold": 0.5, "cut_from_input_truth": True}, "give one way")):  # fmt: skip
        with pytest.raises(FilterError, match=message):
            filter_dataset(checkpoint, source, tmp_path / "bad", **{**common, **bad})
        assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_filter_exports_to_onnx_predicts_per_hit_and_serves_as_an_mlflow_model(filter_run, tmp_path):
    root, run = filter_run
    checkpoint, source = _checkpoint(run), Path(run.data.tags["dataset"])
    report = export(checkpoint, tmp_path / "filter.onnx", source, check_events=4)
    assert report["judged"] == "hit probabilities" and report["beyond_tolerance"] == 0
    assert max(b["max_abs_diff"]["hit_probability"] for b in report["batches"].values()) < 1e-5
    model, cfg = load_model(checkpoint, kind=HitFilter)
    n = predict(model, cfg, source, tmp_path / "pred.h5", split="test", progress=False)
    with h5py.File(tmp_path / "pred.h5") as f:
        assert f.attrs["model"] == "hit_filter" and len(f["event_index"]) == n > 0
        assert len(f["hit_probability"]) == f["num_hits"][:].sum() == len(f["kept/wp0.99"])
        assert ((f["hit_probability"][:] >= model.stored_cuts()[0.99]) == f["kept/wp0.99"][:]).all()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    reader = DatasetReader(source)
    out = served.predict(stored_events(reader, [0, 1]))
    assert (
        out["hit_probability"].shape == (2, max(reader.num_hits()[:2])) and out["kept_wp0.99"].dtype == bool
    )

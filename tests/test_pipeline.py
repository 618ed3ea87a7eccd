"""The whole ATLAS chain end to end, as `make pipeline` runs it, at a small pile-up: ROOT dumps ->
`muonreg-prepare root` -> a hit filter trained by train.py (its cuts set on validation) ->
`muonreg-prepare filter --simulate` at the stored cut -> the tracker -> the per-stage summary.
Every stage's output is read back."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
import yaml

from muonreg.data.format import DatasetReader
from muonreg.data.schema import HIT_FEATURES, TRACK_FEATURES, TRUTH_LINK

from train_cli import ENV, ROOT, client

pytestmark = pytest.mark.slow
LINK = HIT_FEATURES.index(TRUTH_LINK)


def test_make_pipeline_from_root_dumps_to_a_trained_tracker(tmp_path):
    pipe = tmp_path / "pipe"
    smoke = f"debug=smoke paths.root={tmp_path} trainer.max_epochs=1"
    command = [
        "make", "--no-print-directory", "pipeline", f"PIPELINE={pipe}", "PILEUP=5", "FILTER_EVENTS=120",
        "TRACKER_EVENTS=150", f"FILTER_ARGS={smoke}", f"TRACKER_ARGS={smoke} evaluation.assigned_fit_events=0",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    prepared = DatasetReader(pipe / "filter_data")
    summary = prepared.metadata["processing_summary"]
    assert summary["events_seen"] == 120 and summary["events_kept"] == len(prepared) > 0
    events = [prepared.read(i) for i in range(len(prepared))]
    pt, eta = TRACK_FEATURES.index("truthMuon_pt"), TRACK_FEATURES.index("truthMuon_eta")
    assert all((e.tracks[:, pt] >= 5).all() and (np.abs(e.tracks[:, eta]) <= 2.7).all() for e in events)
    assert np.mean([len(e.hits) for e in events]) > 200  # pile-up: mostly background hits

    checkpoint = pipe / "filter_run" / "checkpoints" / "best.pt"
    stored = torch.load(checkpoint, weights_only=False)["model"]
    cut = float(stored["cuts"][stored["working_points"].tolist().index(0.99)])
    assert 0 < cut < 1  # set on the filter's validation split and stored with its weights
    assert (pipe / "filter_run" / "evaluation" / "hit_filter.md").is_file()

    tracking = DatasetReader(pipe / "tracking_data")
    record = yaml.safe_load((pipe / "tracking_data" / "metadata.yaml").read_text())["processing_parameters"]
    kept = record["hit_filter"]
    assert kept["cut_from"] == "stored" and kept["threshold"] == pytest.approx(cut)
    assert (
        record["source_processing_parameters"]["seed"] == 1
        and record["source_processing_parameters"]["pileup"] == 5
    )
    assert kept["losses"]["events_written"] == len(tracking) > 0 and kept["losses"]["events_in"] <= 150
    for i in range(len(tracking)):
        event = tracking.read(i)
        links = event.hits[:, LINK]
        assert len(event.hits) <= 600 and 1 <= len(event.tracks) <= 2
        assert set(np.unique(links[links >= 0]).astype(int)) == set(range(len(event.tracks)))  # renumbered
        assert all((links == k).sum() >= 3 for k in range(len(event.tracks)))

    mlflow = client(tmp_path)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("pipeline").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert {"val/auc", "test/road/auc", "test/track_efficiency"} <= {k for r in runs for k in r.data.metrics}
    out = result.stdout
    for line in ("== pipeline", "filter_data: ", "hit filter, test split: AUC", "road >= 8 layers", "tracking set (stored cut", "tracker, test split: track efficiency", "| least-squares fit |"):  # fmt: skip
        assert line in out, out[-3000:]

"""The whole ATLAS chain end to end on a small simulated example (what `make pipeline` runs):
ROOT dumps with pile-up -> `muonreg-prepare root` -> a hit filter trained by train.py ->
`muonreg-prepare filter` -> the tracker trained on its output. Every stage's output is read back."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml
from test_train_e2e import ENV, ROOT, client

from muonreg.data.format import DatasetReader
from muonreg.data.schema import HIT_FEATURES, TRACK_FEATURES, TRUTH_LINK

pytestmark = pytest.mark.slow
LINK = HIT_FEATURES.index(TRUTH_LINK)


def _run(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{args}:\n{result.stderr[-4000:]}"


def _train(root, *overrides: str) -> None:
    _run("train.py", "debug=smoke", f"paths.root={root}", "tracking.experiment=pipeline", *overrides)


def test_root_with_pileup_to_a_trained_tracker(tmp_path):
    ntuples, filter_data, tracking_data = (
        tmp_path / "ntuples",
        tmp_path / "filter_data",
        tmp_path / "tracking",
    )
    _run("-m", "muonreg.data.simulate_cli", "--format", "root", "--events", "120", "--files", "2",
         "--pileup", "5", "--out", str(ntuples))  # fmt: skip
    _run(
        "-m",
        "muonreg.prepare",
        "root",
        "--input",
        str(ntuples),
        "--output",
        str(filter_data),
        "--workers",
        "2",
    )
    prepared = DatasetReader(filter_data)
    summary = prepared.metadata["processing_summary"]
    assert summary["events_seen"] == 120 and summary["events_kept"] == len(prepared) > 0
    assert summary["events_kept"] + sum(summary["events_dropped"].values()) == 120
    events = [prepared.read(i) for i in range(len(prepared))]
    pt, eta = TRACK_FEATURES.index("truthMuon_pt"), TRACK_FEATURES.index("truthMuon_eta")
    assert all((e.tracks[:, pt] >= 5).all() and (np.abs(e.tracks[:, eta]) <= 2.7).all() for e in events)
    assert np.mean([len(e.hits) for e in events]) > 200  # pile-up: mostly background hits

    _train(
        tmp_path, "model=hit_filter", f"data.path={filter_data}", f"hydra.run.dir={tmp_path / 'filter_run'}"
    )
    checkpoint = tmp_path / "filter_run" / "checkpoints" / "best.pt"
    _run("-m", "muonreg.prepare", "filter", "--checkpoint", str(checkpoint), "--working-point", "0.99",
         "--input", str(filter_data), "--output", str(tracking_data))  # fmt: skip
    tracking = DatasetReader(tracking_data)
    record = yaml.safe_load((tracking_data / "metadata.yaml").read_text())["processing_parameters"][
        "hit_filter"
    ]
    assert record["working_point"] == 0.99 and record["checkpoint"] == str(checkpoint.resolve())
    assert record["losses"]["events_written"] == len(tracking) > 0
    for i in range(len(tracking)):
        event = tracking.read(i)
        links = event.hits[:, LINK]
        assert len(event.hits) <= 600 and 1 <= len(event.tracks) <= 2
        assert set(np.unique(links[links >= 0]).astype(int)) == set(
            range(len(event.tracks))
        )  # renumbered 0..n-1
        assert all((links == k).sum() >= 3 for k in range(len(event.tracks)))

    _train(tmp_path, f"data.path={tracking_data}", f"hydra.run.dir={tmp_path / 'tracker_run'}")
    mlflow = client(tmp_path)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("pipeline").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert {"val/auc", "test/track_efficiency"} <= {k for r in runs for k in r.data.metrics}

"""Errors a user causes (data, tracking store, config) print one line naming the fault, no traceback;
HYDRA_FULL_ERROR=1 brings the traceback back. Real `train.py` processes."""

from __future__ import annotations

import os
import shutil
import subprocess

import mlflow
import pytest

from conftest import random_events, write_reference_dataset
from train_cli import ENV, ROOT, command

pytestmark = pytest.mark.slow


def _no_muon_dataset(tmp_path):
    hits, tracks = random_events(40, seed=3)
    for i in range(len(tracks)):
        tracks[i], hits[i][:, -1] = tracks[i][:0], -1
    return write_reference_dataset(tmp_path / "nomuon", hits, tracks)


def _run(tmp_path, data_dir, fault: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, str]:
    """Run train.py with one fault; return the process and the fault's expected message."""
    overrides, multirun = [], False
    if fault == "data":
        path = _no_muon_dataset(tmp_path)
        overrides, expected = (
            [f"data.path={path}", "data.split=[0.8,0.1,0.1]"],  # 40 events: train rows 0..31
            f"{path}: the train split (dataset events 0..31) holds no muon",
        )
    elif fault == "tracking":
        env = {**env, "MLFLOW_TRACKING_URI": str(tmp_path / "x")}
        expected = f"tracking URI '{tmp_path / 'x'}' (MLFLOW_TRACKING_URI, tracking.uri or --tracking-uri) is a plain path"
    else:
        (tmp_path / "a_file").write_text("")
        overrides, multirun = [f"hydra.sweep.dir={tmp_path / 'a_file' / 'sweep'}"], True
        expected = f"hydra.sweep.dir='{tmp_path / 'a_file' / 'sweep'}' cannot be created"
    cmd = command(tmp_path, data_dir, *overrides, multirun=multirun)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300), expected


@pytest.mark.parametrize("fault", ["data", "tracking", "sweep_dir"])
def test_a_user_error_is_one_line_without_traceback(tmp_path, data_dir, empty_mlflow_db, fault):
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    result, expected = _run(tmp_path, data_dir, fault, ENV)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "epoch 0" not in result.stdout  # nothing trained
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    statuses = [
        r.info.status for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
    ]
    assert "RUNNING" not in statuses  # a run or sweep parent opened before the error is closed


def test_hydra_full_error_shows_the_traceback(tmp_path, data_dir):
    result, expected = _run(tmp_path, data_dir, "data", {**ENV, "HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr and "DataFormatError" in result.stderr
    assert expected in result.stderr
    assert os.environ.get("HYDRA_FULL_ERROR") != "1"  # the switch stayed in the child

"""Resume never corrupts a run: real `train.py` processes killed with real signals, then resumed.

A run lives in one directory however often it is resumed, a finished run is never written to
again, a kill after the last epoch resumes at the test evaluation, and a kill before the first
checkpoint continues the same MLflow run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from muonreg.tracking.runs import CONTINUED

from train_cli import client, last_sidecar, run_train, runs, signal_when, split

pytestmark = pytest.mark.slow


@pytest.fixture
def root(tmp_path, empty_mlflow_db) -> Path:
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    return tmp_path


def _steps(root: Path, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client(root).get_metric_history(run_id, key))


def test_resume_continues_in_the_original_directory_and_never_touches_a_finished_run(root, data_dir):
    # DataLoader workers, forked by the killed process, must not make its run look alive
    common = ["trainer.max_epochs=3", "trainer.checkpoint_every_steps=1", "trainer.num_workers=2"]
    signal_when(root, data_dir, common, lambda: last_sidecar(root).get("global_step", 0) >= 11)  # in epoch 1
    (killed,) = runs(root)
    assert killed.info.status == "RUNNING"

    run_train(root, data_dir, *common, "resume=auto")
    (run,) = runs(root)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    checkpoints = list(root.glob("outputs/**/checkpoints/last.pt"))
    assert len(checkpoints) == 1, "the resumed run must go on in its own directory"
    assert json.loads((checkpoints[0].parent.parent / "run.json").read_text())["done"]
    history = {
        key: _steps(root, run.info.run_id, key) for key in ("val/loss", "test/loss", "train/step_loss")
    }
    assert history["val/loss"] == [0, 1, 2] and history["test/loss"] == [3]
    assert history["train/step_loss"] == list(range(1, len(history["train/step_loss"]) + 1))  # none twice

    run_train(root, data_dir, *common, "resume=auto")  # nothing unfinished left: a fresh run
    after = {r.info.run_id: r for r in runs(root)}
    assert len(after) == 2 and all(r.info.status == "FINISHED" for r in after.values())
    assert {key: _steps(root, run.info.run_id, key) for key in history} == history  # untouched


def test_a_kill_after_the_last_epoch_resumes_at_the_test_evaluation(root, data_dir):
    common = ["trainer.max_epochs=2"]
    signal_when(root, data_dir, common, lambda: last_sidecar(root).get("finished", False))
    (killed,) = runs(root)
    assert killed.info.status == "RUNNING" and "test/loss" not in killed.data.metrics
    trained = last_sidecar(root)["global_step"]

    result = run_train(root, data_dir, *common, "resume=auto")
    assert "training had finished: on to the test evaluation" in result.stdout + result.stderr
    (run,) = runs(root)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert last_sidecar(root)["global_step"] == trained  # not one step trained again
    assert _steps(root, run.info.run_id, "train/loss") == [0, 1]
    assert _steps(root, run.info.run_id, "test/loss") == [2]


def test_a_kill_before_the_first_checkpoint_continues_the_same_mlflow_run(root, data_dir):
    def training() -> bool:
        return any("epoch 0 batch 2/" in log.read_text() for log in root.glob("outputs/**/train.log"))

    signal_when(root, data_dir, [], training)  # default checkpointing: none written yet
    assert not list(root.glob("outputs/**/checkpoints/last.pt"))
    (killed,) = runs(root)
    run_train(root, data_dir, "resume=auto")
    (run,) = runs(root)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"


def test_a_sweep_whose_job_continues_an_earlier_run_finishes_and_names_it(root, data_dir):
    """`-m resume=auto` continuing a run another launch started: the run stays where it was, and the
    new sweep ends FINISHED (it had no children of its own: it used to end FAILED) and names the run."""
    common = ["trainer.max_epochs=2"]
    signal_when(root, data_dir, common, lambda: last_sidecar(root).get("finished", False))
    (killed,) = runs(root)
    run_train(root, data_dir, *common, "resume=auto", multirun=True)
    (parent,), (run,) = split(runs(root))
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in run.data.tags
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[CONTINUED + run.info.run_id] == "resume"

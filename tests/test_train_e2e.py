"""End to end: real `python train.py` subprocesses writing real MLflow runs (SQLite), read back.

Every test works in its own directory (paths.root) and shares one small simulated dataset.
"""

from __future__ import annotations

import math
import shutil
import signal
from pathlib import Path

import h5py
import pytest
import torch

from muonreg.data.simulate import write_simulated_dataset

from conftest import SMOKE_RUN_OVERRIDES
from train_cli import client, last_sidecar, run_train, runs, signal_when, split

pytestmark = pytest.mark.slow


def test_single_run_logs_params_metrics_and_artifacts(smoke_run, tmp_path):
    root = smoke_run.root
    (run,) = runs(root)
    # The run's last words are its summary (network beside the fit, tracking, report, run id, UI),
    # after the model's logging and without MLflow's warnings about it.
    output = smoke_run.stdout + smoke_run.stderr
    summary = smoke_run.stdout[smoke_run.stdout.rindex("test split, ") :]
    assert "core ratio" in summary and "tracking: efficiency" in summary and "resolution.md" in summary
    assert "held-out detector, 200 events (seed 34567, alignment seed 45678" in summary
    assert summary.rstrip().endswith(
        f"MLflow run {run.info.run_id}: `make ui` and open http://127.0.0.1:5000"
    )
    for noise in ("Add type hints", "CloudPickle", "Downloading artifacts"):
        assert noise not in output, noise
    assert run.info.status == "FINISHED"
    assert run.data.params["assignment_threshold"] == "0.2" and run.data.params["model.dim"] == "32"
    assert (
        "mlflow.parentRunId" not in run.data.tags and "assignment_threshold=0.2" in run.data.tags["overrides"]
    )
    metrics = run.data.metrics
    for key in ("train/loss", "val/loss", "test/loss", "val/track_efficiency", "health/nonfinite_steps"):
        assert key in metrics and math.isfinite(metrics[key]), key
    # the chosen checkpoint on the validation split (debug=smoke: no validation set) and the held-out set
    for prefix in ("validation", "heldout", "test"):
        assert metrics[f"{prefix}/loss"] > 0 and f"{prefix}/paired_muons_pt5_10" in metrics, prefix
    assert (
        sum(metrics[f"heldout/muons_{b}"] for b in ("pt5_10", "pt10_20", "pt20_50", "pt50_100", "pt100_200"))
        > 200
    )
    assert run.data.tags["torch_threads"] == "1"
    artifacts = {a.path for a in client(root).list_artifacts(run.info.run_id)}
    assert {".hydra", "checkpoints", "config"} <= artifacts
    reports = {a.path for a in client(root).list_artifacts(run.info.run_id, "evaluation/heldout")}
    assert {"evaluation/heldout/resolution.md", "evaluation/heldout/ratio_vs_pt.png"} <= reports
    best = client(root).download_artifacts(run.info.run_id, "checkpoints/best.pt", str(tmp_path / "dl"))
    assert "model" in torch.load(best, weights_only=False)


def test_two_runs_of_one_configuration_give_identical_metrics(smoke_run, tmp_path, data_dir):
    """What a CPU run promises (README, "Reproducibility"): the same seed, settings, data, torch build and
    number of intra-op threads give the same network, hence the same metrics to the last bit. (The
    shared smoke run may carry more: other tests' evaluations, under their own prefixes.)"""
    run_train(tmp_path, data_dir, *SMOKE_RUN_OVERRIDES)
    (again,) = runs(tmp_path)
    (first,) = runs(smoke_run.root)
    measured = [k for k in again.data.metrics if "events_per_s" not in k]  # wall-clock speeds differ
    assert len(measured) > 100
    assert {k: again.data.metrics[k] for k in measured} == {k: first.data.metrics[k] for k in measured}
    history = [
        client(root).get_metric_history(r.info.run_id, "train/step_loss")
        for root, r in ((tmp_path, again), (smoke_run.root, first))
    ]
    assert [m.value for m in history[0]] == [m.value for m in history[1]] and len(history[0]) > 3


def test_a_bf16_run_on_the_cpu_finishes_with_finite_physics(tmp_path, data_dir):
    """The GPU default precision, exercised where there is no GPU: CPU bf16 autocast end to end."""
    run_train(tmp_path, data_dir, "trainer.precision=bf16")
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.params["trainer.precision"] == "bf16"
    assert all(math.isfinite(run.data.metrics[k]) for k in ("test/loss", "val/loss", "train/loss"))


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local"])
def test_threshold_sweep_makes_a_parent_and_three_children(tmp_path, data_dir, launcher):
    # joblib with a loader worker: DataLoader workers must start inside loky's processes.
    extra = {
        "basic": [],
        "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=3", "trainer.num_workers=1"],
    }
    extra = extra.get(launcher, [f"hydra/launcher={launcher}"])
    run_train(tmp_path, data_dir, "assignment_threshold=0.1,0.2,0.5", *extra, multirun=True)
    parents, children = split(runs(tmp_path))
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert sorted(c.data.params["assignment_threshold"] for c in children) == ["0.1", "0.2", "0.5"]
    assert sorted(c.data.tags["hydra.job.num"] for c in children) == ["0", "1", "2"]
    assert all(math.isfinite(c.data.metrics["test/loss"]) for c in children)


def test_a_failing_job_fails_its_child_and_the_parent(tmp_path, data_dir):
    good = write_simulated_dataset(tmp_path / "good", 200, seed=1, progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    with h5py.File(bad / "data/events_0000.h5", "r+") as f:  # a truth link to a muon that does not exist
        hits = f["hits"][0]
        hits[0, 19] = 7
        f["hits"][0] = hits
    result = run_train(tmp_path, data_dir, f"data.path={good},{bad}", multirun=True, check=False)
    assert result.returncode != 0 and "truthLink value 7.0" in result.stderr
    parents, children = split(runs(tmp_path))
    assert parents[0].info.status == "FAILED"
    status = {c.data.params["data.path"]: c.info.status for c in children}
    assert status == {str(good): "FINISHED", str(bad): "FAILED"}


def _final_parameters(root: Path) -> dict[str, torch.Tensor]:
    (last,) = sorted(root.glob("outputs/**/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime)[-1:]
    return torch.load(last, weights_only=False)["model"]


RESUMED = ("trainer.max_epochs=3", "trainer.checkpoint_every_steps=1")


@pytest.fixture(scope="module")
def straight_parameters(tmp_path_factory, data_dir) -> dict[str, torch.Tensor]:
    """The final weights of a run of RESUMED's configuration that nothing stopped."""
    root = tmp_path_factory.mktemp("straight")
    run_train(root, data_dir, *RESUMED)
    return _final_parameters(root)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGKILL, "RUNNING"), (signal.SIGTERM, "KILLED")])
def test_kill_and_resume_continues_exactly(straight_parameters, tmp_path, data_dir, signum, status):
    common = list(RESUMED)
    expected = straight_parameters

    root = tmp_path / "killed"
    # mid-way through the second epoch
    signal_when(root, data_dir, common, lambda: last_sidecar(root).get("global_step", 0) >= 11, signum)
    (killed_run,) = runs(root)
    assert killed_run.info.status == status  # SIGKILL leaves no chance to close; a scheduler's SIGTERM does

    run_train(root, data_dir, *common, "resume=auto")
    resumed = _final_parameters(root)
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    (run,) = runs(root)  # the same MLflow run continued
    assert run.info.run_id == killed_run.info.run_id and run.info.status == "FINISHED"
    history = client(root).get_metric_history(run.info.run_id, "val/loss")
    assert sorted(m.step for m in history) == [0, 1, 2]


def _progress(root: Path, marker: str) -> bool:
    return any(marker in log.read_text() for log in root.glob("outputs/*/*/train.log"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_mid_epoch_checkpoints_that_step_and_ends_in_one_line(tmp_path, data_dir, signum):
    """A scheduler's SIGTERM and a terminal's Ctrl-C (SIGINT to the whole process group, the loader
    worker included) stop alike: the step ends, last.pt is written there, one line, no traceback."""
    overrides = ["trainer.batch_size=8", "trainer.num_workers=1"]  # 35 steps in the epoch
    returncode, stderr = signal_when(
        tmp_path,
        data_dir,
        overrides,
        lambda: _progress(tmp_path, "epoch 0 batch 5/"),
        signum,
        group=signum == signal.SIGINT,
    )
    name = signal.Signals(signum).name
    assert returncode == 128 + signum and "Traceback" not in stderr, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"stopped by {name}: checkpoint {tmp_path / 'outputs'}"), stderr
    assert last_line.endswith("; continue it with resume=auto")
    step = last_sidecar(tmp_path)["global_step"]
    assert f"at epoch 0, batch {step};" in last_line and 5 <= step < 35  # written at the interrupt
    (killed,) = runs(tmp_path)
    assert killed.info.status == "KILLED"

    result = run_train(tmp_path, data_dir, *overrides, "resume=auto")
    assert f"resumed at epoch 0, batch {step}" in result.stdout  # from that very step
    (run,) = runs(tmp_path)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"

"""Clusters on one CPU: torchrun and SLURM tasks as real gloo process groups, a submitit job warned
by SLURM's signal and requeued, a SLURM sweep on SQLite.

Each job, however many processes train it and however often it is requeued, has one Hydra output
directory and one MLflow run, and a sweep one parent run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_cli import ENV, ROOT, client, command, runs, split

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture
def root(tmp_path, empty_mlflow_db) -> Path:
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    return tmp_path


def _check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _one_finished_run(root: Path) -> None:
    (run,) = runs(root)  # the other rank logs nothing
    assert run.info.status == "FINISHED" and math.isfinite(run.data.metrics["test/loss"])
    history = client(root).get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 1]
    (output_dir,) = root.glob("outputs/*/*")  # one Hydra output directory for both ranks
    assert (output_dir / ".hydra" / "config.yaml").is_file()
    assert [p.parent.parent for p in root.glob("outputs/**/checkpoints/last.pt")] == [output_dir]


def test_two_process_data_parallel_training_under_torchrun(root, data_dir):
    cmd = [*TORCHRUN, *command(root, data_dir, "trainer.max_epochs=2")[1:]]
    _check(subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180))
    _one_finished_run(root)


def _slurm_tasks(root: Path, data_dir: Path, restarts: int = 0) -> list[subprocess.Popen]:
    """The two tasks of one srun step (no WORLD_SIZE), as SLURM starts them (again, after `restarts`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"}
    slurm |= {
        "SLURM_STEP_NODELIST": "localhost",
        "MASTER_PORT": str(port),
        "SLURM_RESTART_COUNT": str(restarts),
    }
    return [
        subprocess.Popen(
            command(root, data_dir, "trainer.max_epochs=2"),
            cwd=ROOT,
            env={**ENV, **slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]


def test_two_slurm_tasks_form_one_job_that_stops_together_and_continues_when_requeued(root, data_dir):
    """Two SLURM tasks are one process group and one run. SLURM's warning signal reaching one task only
    stops both at the same step, after a checkpoint; the job SLURM starts again (SLURM_RESTART_COUNT=1,
    a new output directory) continues that run."""
    first = _slurm_tasks(root, data_dir)
    deadline = time.time() + 120
    while time.time() < deadline and not any(
        "epoch 1 batch 1/" in log.read_text() for log in root.glob("outputs/*/*/train.log")
    ):
        time.sleep(0.02)
    first[1].send_signal(signal.SIGUSR2)
    logs = [p.communicate(timeout=180)[0] for p in first]
    assert all(p.returncode != 0 for p in first)
    assert "stopped by a signal to another process of the job: checkpoint" in logs[0]  # rank 1 got it
    (killed,) = runs(root)
    assert killed.info.status == "KILLED"
    (sidecar,) = root.glob("outputs/*/*/checkpoints/last.pt.json")
    assert json.loads(sidecar.read_text())["epoch"] == 1  # mid-epoch: the checkpoint of the signal

    again = _slurm_tasks(root, data_dir, restarts=1)
    logs = [p.communicate(timeout=180)[0] for p in again]
    assert [p.returncode for p in again] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    (run,) = runs(root)  # the other rank logs nothing, and the requeued job continued the run
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert sorted(m.step for m in client(root).get_metric_history(run.info.run_id, "val/loss")) == [0, 1]
    steps = sorted(m.step for m in client(root).get_metric_history(run.info.run_id, "train/step_loss"))
    assert steps == list(range(1, 9))  # 4 steps per epoch and rank, each logged once
    assert [p.parent.parent for p in root.glob("outputs/**/checkpoints/last.pt")] == [sidecar.parent.parent]
    assert "SLURM job 4242 records into the SQLite file" in logs[0]  # and says how to start a server
    assert "mlflow server" in logs[0] and "SQLite" not in logs[1]


def test_a_sweep_under_torchrun_has_one_parent_and_runs_each_job_on_all_ranks(root, data_dir):
    cmd = [*TORCHRUN, *command(root, data_dir, "seed=0,1", multirun=True)[1:]]
    _check(subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300))
    parents, children = split(runs(root))
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    (sweep_dir,) = root.glob("multirun/*/*")
    assert sorted(p.parent.name for p in sweep_dir.glob("*/run.json")) == ["0", "1"]


def test_a_slurm_sweep_on_sqlite_is_refused_before_anything_is_submitted(root, data_dir):
    cmd = command(root, data_dir, "seed=0,1", "hydra/launcher=slurm", multirun=True)
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "hydra/launcher=slurm with the SQLite tracking store" in result.stderr
    assert "mlflow server --backend-store-uri" in result.stderr and "MLFLOW_TRACKING_URI" in result.stderr
    assert client(root).get_experiment_by_name("muonreg") is None  # no parent run, nothing submitted
    assert not list(root.glob("multirun/**/.submitit"))


def _task_pid(root: Path) -> int | None:
    """The submitit task process of a job of this test's sweep."""
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if b"submitit.core._submit" in cmdline and any(str(root).encode() in a for a in cmdline):
                return int(proc.name)
    return None


def test_a_submitit_job_warned_by_usr2_checkpoints_is_requeued_and_continues_its_run(root, data_dir):
    """SLURM's warning signal (USR2, the one submitit asks for) mid-epoch: the job checkpoints, submitit
    requeues it, and the requeued job (same arguments, same directory) continues the same run."""
    cmd = command(root, data_dir, "hydra/launcher=submitit_local", "trainer.max_epochs=3", multirun=True)
    sweep = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def job_log() -> str:
        return "".join(log.read_text() for log in root.glob("multirun/*/*/0/train.log"))

    deadline = time.time() + 120
    while "epoch 1 batch 3/" not in job_log() and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.02)
    os.kill(_task_pid(root), signal.SIGUSR2)
    assert sweep.wait(timeout=300) == 0
    log = job_log()
    assert "stopped by SIGUSR2: checkpoint" in log and "continuing the unfinished run" in log
    assert "resumed at epoch 1, batch 4" in log  # the step after the signal's
    parents, (child,) = split(runs(root))
    assert parents[0].info.status == "FINISHED" and child.info.status == "FINISHED"
    steps = sorted(m.step for m in client(root).get_metric_history(child.info.run_id, "train/step_loss"))
    per_epoch = int(re.search(r"epoch 0 batch \d+/(\d+)", log).group(1))
    assert steps == list(range(1, 3 * per_epoch + 1))  # every step once

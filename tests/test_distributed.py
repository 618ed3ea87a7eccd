"""Cluster plumbing on one CPU: launcher environments, stop signals (real ones), checkpoint on a stop.

The multi-process runs (torchrun, SLURM tasks, requeue) are in test_cluster.py.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from test_training import _trainer, loaders  # noqa: F401  (the shared small dataset fixture)
from torch import nn

from muonreg.config import ConfigError, launch_time
from muonreg.training.checkpoint import load_checkpoint
from muonreg.training.distributed import LAUNCH_TIME, Launch, MainRankFailed, first_host, launch, setup
from muonreg.training.interrupts import Interrupts, Stopped
from muonreg.training.run import check_world_size

SLURM_STEP = {  # what srun gives task 3 of 4 on two nodes
    "SLURM_JOB_ID": "81234",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[017-018]",
    "SLURM_STEP_NODELIST": "gpu[017-018]",
}


def test_first_host_of_slurm_node_lists():
    assert first_host("node7") == "node7"
    assert first_host("gpu[017-018,020],cpu1") == "gpu017"
    assert first_host("a[3,5]-ib,b2") == "a3-ib"


def test_torchrun_variables_win():
    env = {**SLURM_STEP, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    assert launch(env) == Launch(rank=1, local_rank=1, size=2)  # torchrun sets the rendezvous itself


def test_a_slurm_step_maps_to_rank_local_rank_and_a_rendezvous_on_its_first_node():
    where = launch(SLURM_STEP)
    assert (where.rank, where.local_rank, where.size) == (3, 1, 4)
    assert where.env == {
        "MASTER_ADDR": "gpu017",
        "MASTER_PORT": str(20000 + 81234 % 20000),
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
    }
    assert (
        launch({**SLURM_STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}).env["MASTER_PORT"]
        == "29400"
    )


def test_a_batch_script_of_a_multi_task_job_is_one_process():
    batch_shell = {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP")}
    assert launch(batch_shell) == Launch()  # sbatch sets SLURM_NTASKS, only srun SLURM_STEP_NUM_TASKS
    assert launch({}) == Launch()


def test_all_ranks_name_the_same_directory_from_the_shared_launch_time(monkeypatch):
    monkeypatch.setenv(LAUNCH_TIME, "1767225600.123456")
    assert launch_time("%H-%M-%S-%f")[-6:] == "123456"
    assert launch_time("%H-%M-%S-%f") == launch_time("%H-%M-%S-%f")


def test_a_signal_stops_at_once_outside_training_and_is_handed_to_the_launchers_handler():
    received = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    try:
        with pytest.raises(Stopped, match="stopped by SIGUSR2"), Interrupts().installed():
            os.kill(os.getpid(), signal.SIGUSR2)
        assert received == [signal.SIGUSR2]  # submitit's requeue handler would run here
        os.kill(os.getpid(), signal.SIGUSR2)
        assert received == [signal.SIGUSR2] * 2  # and it is back in place
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_a_signal_during_training_only_asks_to_stop():
    with Interrupts().installed() as interrupts, interrupts.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupts.requested and interrupts.signum == signal.SIGTERM


def test_a_stop_signal_checkpoints_the_step_and_the_run_continues_exactly(loaders, tmp_path):  # noqa: F811
    straight = _trainer(loaders, tmp_path / "a", max_epochs=2)
    straight.fit()

    def signal_at_step_3(metrics: dict, step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    with Interrupts().installed() as interrupts:
        stopped = _trainer(
            loaders,
            tmp_path / "b",
            max_epochs=2,
            log=signal_at_step_3,
            log_every_steps=1,
            interrupts=interrupts,
        )
        with pytest.raises(Stopped, match=r"stopped by SIGUSR1: checkpoint .* at epoch 0, batch 3"):
            stopped.fit()
    state = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert (state["trainer"]["epoch"], state["trainer"]["step_in_epoch"]) == (0, 3)  # not an epoch end

    resumed = _trainer(loaders, tmp_path / "c", max_epochs=2, seed=123)
    resumed.load_state_dict(state)
    resumed.fit()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_run_continues_only_with_as_many_processes_as_trained_it(tmp_path):
    check_world_size({"world_size": 2}, 2, tmp_path)
    check_world_size({}, 1, tmp_path)  # written by one process before the field existed
    with pytest.raises(ConfigError, match=r"trained by 2 process.*this job has 4"):
        check_world_size({"world_size": 2}, 4, tmp_path)


def _start_a_run(rank: int, port: int, outcome) -> None:
    """One rank of a two-process gloo job whose rank 0 cannot claim its run."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    def claim() -> str:
        raise ConfigError("resume='x': its run is finished")

    try:
        setup().from_main(claim)
    except (ConfigError, MainRankFailed) as err:
        outcome.put((rank, type(err).__name__, str(err)))


def test_when_rank_0_cannot_start_the_run_no_rank_waits_for_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outcome = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_start_a_run, args=(port, outcome), nprocs=2, join=True)
    found = sorted(outcome.get() for _ in range(2))
    assert found == [
        (0, "ConfigError", "resume='x': its run is finished"),
        (1, "MainRankFailed", "rank 0 failed: resume='x': its run is finished"),
    ]


def _cycle_groups(rank: int, port: int, cycles: int) -> None:
    """One rank of a job that, like a sweep's jobs, makes a group, trains, checkpoints and leaves it again."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for _ in range(cycles):
        world = setup()
        net = world.wrap(nn.Linear(4, 4))
        net(torch.randn(2, 4)).sum().backward()
        world.gather(torch.get_rng_state())  # as a checkpoint does
        world.close()
        del net  # DistributedDataParallel held the group's last reference


def test_leaving_the_group_after_a_checkpoint_never_hangs():
    """gloo frees finished work on its own thread, which needs the GIL; before `close` waited for that,
    freeing the group here hung within 20 cycles every time (6 of 6 tries)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = mp.spawn(_cycle_groups, args=(port, 20), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not job.join(timeout=1):
        if time.monotonic() > deadline:
            for process in job.processes:
                process.kill()
            pytest.fail("a rank hung leaving its process group")

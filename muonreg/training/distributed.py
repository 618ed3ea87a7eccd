"""Data-parallel training: one process per GPU, under torchrun or as SLURM tasks, with DistributedDataParallel.

Who is who comes from the launcher's environment: torchrun's RANK, LOCAL_RANK and WORLD_SIZE, or else
a SLURM job step's SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NUM_TASKS (srun sets it, for each task
of a step; a batch script that runs python itself is one process, however many tasks the job has).
Under SLURM the rendezvous is the step's first node, at a port derived from the job id, so every task
finds it without talking to the others first; MASTER_ADDR and MASTER_PORT override both. Outside
either launcher everything here is a no-op.

Rank 0 alone owns the run directory, checkpoints, MLflow and validation; the other ranks receive its
numbers (`share`), so every early-stopping and checkpoint decision is the same on every rank. After
training all ranks leave the process group together (`close`), so none waits in a collective while
rank 0 runs the test evaluation alone. CPU runs use gloo, GPUs nccl.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from muonreg.errors import UserError, one_line

T = TypeVar("T")
LAUNCH_TIME = "MUONREG_LAUNCH_TIME"  # rank 0's clock at launch, for `${muonreg.now:...}` on every rank
# Ranks wait in a collective while rank 0 alone validates (each epoch) or starts the next sweep job
# after its test evaluation: far longer than a kernel, so NCCL's 10-minute default is too short.
TIMEOUT = timedelta(minutes=60)
# How long gloo's threads get to free their finished work before the group goes (`_leave_group`).
GLOO_SETTLE_S = 0.05
# A port per SLURM job (jobs sharing a node must not share it), in a range no service uses.
PORT_BASE, PORT_SPAN = 20000, 20000


@dataclass(frozen=True)
class Launch:
    """This process's place in the job, and what env:// rendezvous needs that the launcher did not set."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    env: dict[str, str] = field(default_factory=dict)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[07-09,12],cpu1` -> `gpu07`."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", nodelist)
    if match is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges, suffix = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "") + suffix


def launch(environ: Mapping[str, str] = os.environ) -> Launch:
    """Rank, local rank and size from torchrun's or SLURM's variables (one process without either)."""
    if "WORLD_SIZE" in environ:  # torchrun, which also sets MASTER_ADDR and MASTER_PORT
        size = int(environ["WORLD_SIZE"])
        return Launch(int(environ.get("RANK", "0")), int(environ.get("LOCAL_RANK", "0")), size)
    size = int(environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if size == 1:
        return Launch()
    rank, local = environ["SLURM_PROCID"], environ.get("SLURM_LOCALID", "0")
    nodes = environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"]
    env = {
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodes),
        "MASTER_PORT": environ.get("MASTER_PORT")
        or str(PORT_BASE + int(environ["SLURM_JOB_ID"]) % PORT_SPAN),
        "RANK": rank,
        "LOCAL_RANK": local,
        "WORLD_SIZE": str(size),
    }
    return Launch(int(rank), int(local), size, env)


class MainRankFailed(UserError, RuntimeError):
    """Rank 0 failed at a step the other ranks were waiting for; its own log has the details."""


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device | None = None  # set in a distributed job: this rank's device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.size == 1:
            return model
        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        # The buffers (input and target normalisation) are fitted once and never change: copied from
        # rank 0 at the start, not again before every forward pass.
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)

    def rank_seed(self, seed: int) -> int:
        """A seed of this rank's own, derived from the run's: ranks must not draw the same random numbers."""
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0])

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (the run directory it chose, its validation metrics)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def from_main(self, make: Callable[[], T]) -> T:
        """`make()` run on rank 0, its result on every rank. If it raises (a tracking store that does not
        answer, a run that cannot be resumed), every rank raises, rather than wait for rank 0 forever."""
        if self.size == 1:
            return make()
        if not self.is_main:
            value = self.share(None)
            if isinstance(value, MainRankFailed):
                _leave_group()  # together with rank 0: the job is over
                raise value
            return value
        try:
            value = make()
        except BaseException as err:
            self.share(MainRankFailed(f"rank 0 failed: {one_line(err)}"))
            _leave_group()
            raise
        return self.share(value)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (e.g. their RNG states for a checkpoint)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: torch.Tensor) -> torch.Tensor:
        """A 0/1 float flag that is 1 on every rank when it is 1 on any: on the device, without a host sync."""
        if self.size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def agree(self, *flags: bool) -> list[bool]:
        """Host flags, each true on every rank when true on any (a host sync: call it now and then)."""
        if self.size == 1:
            return list(flags)
        values = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(v) for v in values.tolist()]

    def close(self) -> None:
        """Leave the process group together: from here on rank 0 works alone."""
        if self.size > 1 and dist.is_initialized():
            dist.barrier()
            _leave_group()


def _leave_group() -> None:
    """Destroy the process group once gloo's threads have freed their finished work.

    gloo frees a finished work (a barrier's holds the works before it) on its own thread, and freeing
    a tensor Python made needs the GIL. The group's destructor joins those threads while holding the
    GIL, so if the group's last reference (often DistributedDataParallel's) goes first, the process
    hangs (seen under torchrun sweeps). Sleeping hands the GIL over first."""
    time.sleep(GLOO_SETTLE_S)
    dist.destroy_process_group()


_rendezvous: dict[str, Any] = {}  # the job's store (made once per process) and how many groups it served


def _join(where: Launch, backend: str) -> None:
    """Join a new process group. The jobs of a sweep (`-m`) each make one after the previous was closed,
    each under a fresh key prefix in the store, so a rank that arrives early never reads the addresses
    of the group before."""
    if "store" not in _rendezvous:
        os.environ.update(where.env)
        store, _, _ = next(dist.rendezvous("env://", where.rank, where.size, timeout=TIMEOUT))
        _rendezvous.update(store=store, groups=0)
    _rendezvous["groups"] += 1
    store = dist.PrefixStore(f"muonreg/{_rendezvous['groups']}", _rendezvous["store"])
    dist.init_process_group(backend, store=store, rank=where.rank, world_size=where.size, timeout=TIMEOUT)


def setup() -> World:
    """This process's World, in the process group of a torchrun or SLURM launch (joined if need be)."""
    where = launch()
    if where.size == 1:
        return World()
    cuda = torch.cuda.is_available()
    device = (
        torch.device("cuda", where.local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    )
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        _join(where, "nccl" if cuda else "gloo")
    return World(rank=where.rank, size=where.size, device=device)


def share_launch_time() -> World:
    """Join the job and give every rank rank 0's launch time, before Hydra names the output directory:
    `${muonreg.now:...}` then resolves alike on all ranks, so a job has one directory, not one per rank."""
    world = setup()
    if world.size > 1:
        os.environ[LAUNCH_TIME] = repr(world.share(time.time()))
    return world

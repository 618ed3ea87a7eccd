"""Data-parallel training: one process per GPU under `torchrun`, DistributedDataParallel.

Outside torchrun (WORLD_SIZE unset or 1) everything here is a no-op. Under torchrun each rank
trains on its own shard of the batches (EventBatchSampler's rank/world_size) and every rank
evaluates the full validation set, so early-stopping decisions agree without communication;
only rank 0 writes checkpoints and logs to MLflow. CPU runs use the gloo backend, GPUs nccl.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device | None = None  # set under torchrun: this rank's device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.size == 1:
            return model
        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (e.g. the run directory rank 0 chose)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup() -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return World(rank=dist.get_rank(), size=size, device=device)

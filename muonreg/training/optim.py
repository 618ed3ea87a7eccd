"""AdamW with a one-cycle learning-rate schedule; no weight decay on norms and biases (1-d parameters).

The fused AdamW kernel can skip a step on the device (`step_unless`), so a non-finite step costs
the host no sync to be skipped.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """`optimizer.step()`, skipped on the device where `skip` (a 0/1 float scalar) is 1: parameters,
    moments and step counts stay as they were. This is how torch's GradScaler hands its found_inf
    flag to fused optimizers (AdamW(fused=True) reads `found_inf` and `grad_scale`)."""
    optimizer.found_inf, optimizer.grad_scale = skip, None
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale


def one_cycle(total_steps: int, warmup: float = 0.1, start: float = 1 / 25, end: float = 1e-4):
    """LR factor per step: linear warm-up from `start` to 1, then cosine down to `end`.

    Written out (rather than torch's OneCycleLR) so that runs of a handful of steps work and
    stepping past `total_steps` (e.g. after a resumed, skipped-step epoch) simply stays at `end`.
    """
    warm = max(1, int(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return start + (1 - start) * step / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, one_cycle(total_steps))

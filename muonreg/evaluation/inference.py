"""Running a model over a split: losses, matched predictions, per-muon records.

Shared by training (validation every epoch, the final test) and `python -m muonreg.evaluate`.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.utils.data import DataLoader

from muonreg.evaluation.metrics import TrackRecords, summarise
from muonreg.training.device import autocast, to_device


def unwrap(model: nn.Module) -> nn.Module:
    """The MaskFormer inside a DistributedDataParallel or torch.compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def forward_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, amp_dtype: torch.dtype | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Forward in the run's precision; matching and losses always in float32."""
    with autocast(device, amp_dtype):
        outputs = model(batch)
    outputs = {k: v.float() if v.is_floating_point() else v for k, v in outputs.items()}
    return outputs, unwrap(model).loss(outputs, batch)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    prefix: str = "test",
) -> tuple[dict[str, float], TrackRecords]:
    """Mean losses and tracking metrics (keys `<prefix>/...`), with the per-muon records behind them."""
    model.eval()
    core = unwrap(model)
    sums: dict[str, float] = defaultdict(float)
    records = TrackRecords()
    n = 0
    loader.batch_sampler.set_epoch(0)
    for batch in loader:
        batch = to_device(batch, device)
        outputs, losses = forward_loss(core, batch, device, amp_dtype)  # no DDP collectives
        size = len(batch["event_index"])
        for k, v in losses.items():
            sums[k] += float(v) * size
        n += size
        aligned = core.align(outputs, core.match(outputs, batch))
        records.update(core.predict(aligned, batch["hit_valid"]), batch)
    metrics = {f"{prefix}/{k}": v / max(n, 1) for k, v in sums.items()}
    metrics.update({f"{prefix}/{k}": v for k, v in summarise(records).items()})
    return metrics, records

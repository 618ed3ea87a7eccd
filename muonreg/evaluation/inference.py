"""Running a model over a split: losses, matched predictions, per-muon records; and plain
per-query predictions without any truth (`infer`).

Shared by training (validation every epoch, the final test), `python -m muonreg.evaluate`,
`python -m muonreg.predict` and the MLflow model.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.utils.data import DataLoader

from muonreg.evaluation.metrics import FIELDS, TrackRecords, summarise
from muonreg.tasks.uncertainty import UNCERTAIN
from muonreg.training.device import autocast, to_device

SIGMAS = tuple(f"sigma_{f}" for f in UNCERTAIN)  # the per-track uncertainties of the predictions


def _perfect_tracking(
    predictions: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Predictions whose tracking is the truth (every muon found with exactly its hits)."""
    return {
        **predictions,
        "track_valid": truth["particle_valid"],
        "track_hit_valid": truth["particle_hit_valid"],
    }


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
    diagnostics: TrackRecords | None = None,
) -> tuple[dict[str, float], TrackRecords]:
    """Mean losses and tracking metrics (keys `<prefix>/...`), with the per-muon records behind them.

    `diagnostics`: records filled with the regression run on the truth hit assignment (the oracle
    column); the returned records then also keep each track's hits (TrackRecords.keep_hits).
    """
    model.eval()
    core = unwrap(model)
    sums: dict[str, float] = defaultdict(float)
    records = TrackRecords(keep_hits=diagnostics is not None)
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
        predictions = core.predict(aligned, batch["hit_valid"])
        records.update(predictions, batch)
        if diagnostics is not None:
            with autocast(device, amp_dtype):
                oracle = core.oracle_regression(aligned, batch)
            if oracle:
                diagnostics.update(_perfect_tracking({**predictions, **oracle}, core.truth(batch)), batch)
    metrics = {f"{prefix}/{k}": v / max(n, 1) for k, v in sums.items()}
    if diagnostics is not None and not diagnostics.rows:
        diagnostics.rows.update(records.rows)  # a task without hit pooling: the oracle is the network
    metrics.update({f"{prefix}/{k}": v for k, v in summarise(records).items()})
    return metrics, records


def query_predictions(
    model: nn.Module, outputs: dict[str, torch.Tensor], hit_valid: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What a user of the network gets per event and query, in physical units, from its outputs:
    `valid_probability` [b, n], `hit_probability` [b, n, m] (0 on padding), `eta`, `phi`, `pt`,
    `q` [b, n] and the uncertainties `sigma_qpt` [1/GeV], `sigma_eta`, `sigma_phi` [rad] [b, n]
    (NaN from a network without them: no track fit). No matching: the queries in the network's
    own order."""
    core = unwrap(model)
    physical = core.regression_task.predict(outputs)
    missing = torch.full_like(physical["track_truthMuon_pt"], float("nan"))
    return {
        "valid_probability": torch.sigmoid(outputs["track_valid_logit"]),
        "hit_probability": torch.sigmoid(outputs["track_hit_logit"]) * hit_valid.unsqueeze(1),
        **{f: physical[f"track_truthMuon_{f}"] for f in FIELDS},
        **{s: physical.get(f"track_{s}", missing) for s in SIGMAS},
    }


@torch.no_grad()
def _outputs(
    model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, amp_dtype: torch.dtype | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(float32 outputs, the batch on `device`) of an inference forward in `amp_dtype`."""
    model.eval()
    batch = to_device(batch, device)
    with autocast(device, amp_dtype):
        outputs = model(batch)
    return {k: v.float() if v.is_floating_point() else v for k, v in outputs.items()}, batch


def infer(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """`query_predictions` of a batch (on `device`, in the run's precision; outputs float32)."""
    outputs, batch = _outputs(model, batch, device, amp_dtype)
    return query_predictions(model, outputs, batch["hit_valid"])


def filter_probability(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A hit filter's muon probability of every hit of a batch [b, m] (float32, on `device`)."""
    return unwrap(model).predict(_outputs(model, batch, device, amp_dtype)[0])

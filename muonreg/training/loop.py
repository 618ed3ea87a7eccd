"""The training loop: steps guarded against non-finite numbers, validation, checkpoints, early stopping.

`Trainer` knows nothing about Hydra or MLflow: it gets a model, an optimiser, loaders and a
`log(metrics, step)` callable, so tests drive it directly.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from muonreg.config import ConfigError
from muonreg.evaluation.inference import evaluate, forward_loss, unwrap
from muonreg.evaluation.metrics import TrackRecords
from muonreg.training.checkpoint import rng_state, save_checkpoint, set_rng_state
from muonreg.training.device import to_device
from muonreg.training.health import HealthGuard

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # batches already taken from the current epoch
    global_step: int = 0  # optimiser steps taken (skipped steps excluded)
    best: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the monitored metric last improved
    finished: bool = False


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loaders: dict[str, DataLoader],
        *,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        grad_clip: float = 1.0,
        max_epochs: int = 10,
        max_steps_per_epoch: int | None = None,
        patience: int = 5,
        monitor: str = "val/loss",
        checkpoint_dir: Path,
        checkpoint_every_steps: int = 0,
        checkpoint_every_minutes: float = 0.0,
        guard: HealthGuard,
        log: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
        log_every_steps: int = 20,
        metadata: dict[str, Any] | None = None,
        is_main: bool = True,
    ):
        self.model = model
        self.core = unwrap(model)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.loaders = loaders
        self.device, self.amp_dtype = device, amp_dtype
        self.grad_clip = grad_clip
        self.max_epochs, self.max_steps_per_epoch = max_epochs, max_steps_per_epoch
        self.patience, self.monitor = patience, monitor
        self.checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_every_steps = checkpoint_every_steps
        self.checkpoint_every_s = 60.0 * checkpoint_every_minutes
        self._saved_at = time.monotonic()
        self.guard = guard
        self.log = log
        self.log_every_steps = log_every_steps
        self.metadata = metadata or {}
        self.is_main = is_main
        self.state = TrainState()
        self.progress = is_main and sys.stderr.isatty()

    # -- one step -----------------------------------------------------------------------------
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float] | None:
        """One optimiser step; returns the loss components, or None when the step was skipped."""
        self.model.train()
        _, losses = forward_loss(self.model, batch, self.device, self.amp_dtype)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        # The norm is taken before clipping: clipping by a NaN norm would smear NaN over every
        # gradient and hide which parameter went bad.
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        names = list(losses)
        # one host sync per step for the health check and the logged numbers
        numbers = torch.stack([losses[k].detach() for k in names] + [total_norm.detach()]).tolist()
        values, grad_norm = dict(zip(names, numbers[:-1], strict=True)), numbers[-1]
        if not (math.isfinite(values["loss"]) and math.isfinite(grad_norm)):
            self.guard.bad(self.state.global_step, batch, self.core, lambda: self.model(batch))
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.guard.ok()
        if self.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, total_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.state.global_step += 1
        return {**values, "grad_norm": grad_norm}

    # -- epochs -------------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        loader = self.loaders["train"]
        sampler = loader.batch_sampler
        first = self.state.step_in_epoch  # > 0 when resuming inside this epoch
        sampler.set_epoch(self.state.epoch, start_batch=first)
        total = (
            len(sampler)
            if self.max_steps_per_epoch is None
            else self.max_steps_per_epoch - self.state.step_in_epoch
        )
        sums: dict[str, float] = defaultdict(float)
        events = 0
        start = time.perf_counter()
        bar = tqdm(
            total=max(total, 0), desc=f"epoch {self.state.epoch}", disable=not self.progress, leave=False
        )
        for batch in itertools.islice(loader, max(total, 0)):
            batch = to_device(batch, self.device)
            values = self.train_step(batch)
            events += len(batch["event_index"])
            self.state.step_in_epoch += 1
            bar.update()
            if values is not None:
                for k, v in values.items():
                    sums[k] += v
                sums["_count"] += 1
                if self.state.global_step % self.log_every_steps == 0:
                    rate = events / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", ev_s=f"{rate:.0f}")
                    self.log({"train/step_loss": values["loss"]}, self.state.global_step)
                    if (
                        self.is_main and not self.progress
                    ):  # no terminal (batch job, log file): progress as log lines
                        log.info(
                            "epoch %d batch %d/%d: loss %.4f, %.0f events/s",
                            self.state.epoch,
                            self.state.step_in_epoch,
                            first + total,
                            values["loss"],
                            rate,
                        )
            if self._checkpoint_due(values is not None):
                self.save("last.pt")
        bar.close()
        count = sums.pop("_count", 0)
        metrics = {f"train/{k}": v / count for k, v in sums.items()} if count else {}
        metrics["train/events_per_s"] = events / max(time.perf_counter() - start, 1e-9)
        metrics["health/nonfinite_steps"] = float(self.guard.total)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def _checkpoint_due(self, stepped: bool) -> bool:
        """Every N optimiser steps and, so that a kill at any moment loses little, every few minutes."""
        by_steps = (
            stepped
            and self.checkpoint_every_steps
            and self.state.global_step % self.checkpoint_every_steps == 0
        )
        by_time = self.checkpoint_every_s and time.monotonic() - self._saved_at >= self.checkpoint_every_s
        return bool(by_steps or by_time)

    def evaluate(self, split: str) -> tuple[dict[str, float], TrackRecords]:
        """Mean losses and tracking metrics of a split, with the per-muon records behind them."""
        return evaluate(self.model, self.loaders[split], self.device, self.amp_dtype, prefix=split)

    def fit(self) -> float:
        """Train until max_epochs or early stopping; return the best monitored value."""
        while self.state.epoch < self.max_epochs and not self.state.finished:
            metrics = self.train_epoch()
            metrics.update(self.evaluate("val")[0])
            if self.monitor not in metrics:
                raise ConfigError(
                    f"optimized_metric={self.monitor!r} is not a metric of the epoch; choose one of "
                    f"{sorted(k for k in metrics if k.startswith('val/'))}"
                )
            value = metrics[self.monitor]
            self.state.epoch += 1
            self.state.step_in_epoch = 0
            improved = math.isfinite(value) and value < self.state.best
            if improved:
                self.state.best, self.state.best_epoch, self.state.bad_epochs = value, self.state.epoch - 1, 0
            else:
                self.state.bad_epochs += 1
            self.log(metrics, self.state.epoch - 1)
            if self.is_main:
                log.info(
                    "epoch %d: %s=%.5f (best %.5f at epoch %d), %.0f events/s, %d non-finite steps",
                    self.state.epoch - 1,
                    self.monitor,
                    value,
                    self.state.best,
                    self.state.best_epoch,
                    metrics["train/events_per_s"],
                    self.guard.total,
                )
            if self.state.bad_epochs >= self.patience:
                if self.is_main:
                    log.info(
                        "early stopping: no improvement of %s for %d epochs", self.monitor, self.patience
                    )
                self.state.finished = True
            if self.state.epoch >= self.max_epochs:
                self.state.finished = True
            if improved:
                self.save("best.pt")
            self.save("last.pt")
        return self.state.best

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "trainer": asdict(self.state),
            "nonfinite_steps": self.guard.total,
            "rng": rng_state(),
            "metadata": self.metadata,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = TrainState(**state["trainer"])
        self.guard.total = state["nonfinite_steps"]
        set_rng_state(state["rng"])

    def save(self, name: str) -> Path:
        path = self.checkpoint_dir / name
        if self.is_main:
            sidecar = {
                **self.metadata,
                "epoch": self.state.epoch,
                "global_step": self.state.global_step,
                "finished": self.state.finished,
            }
            save_checkpoint(path, self.state_dict(), sidecar)
        self._saved_at = time.monotonic()
        return path

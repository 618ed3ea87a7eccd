"""The training loop: steps guarded against non-finite numbers, validation, checkpoints, early stopping.

`Trainer` knows nothing about Hydra or MLflow: it gets a model, an optimiser, loaders and a
`log(metrics, step)` callable, so tests drive it directly.

A step never waits for the device: its losses stay there, summed for the epoch; a non-finite step
is skipped on the device and reported to the host when the device has passed it (health.StepFlags);
numbers are read every `log_every_steps` and at the end of the epoch. Under DistributedDataParallel
every decision is the same on every rank: rank 0 validates and shares the metrics, a stop signal or
a time-based checkpoint is agreed on at the logging steps, and checkpoints hold every rank's RNG.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
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
from muonreg.training.checkpoint import rng_state, save_checkpoint, set_rng_state
from muonreg.training.device import to_device
from muonreg.training.distributed import World
from muonreg.training.health import HealthGuard, StepFlags
from muonreg.training.interrupts import Interrupts, stopped_by
from muonreg.training.optim import step_unless

log = logging.getLogger(__name__)


class _FirstBatch:
    """A loader's first batch, as a loader of its own (for `Trainer.check_monitor`)."""

    def __init__(self, loader: DataLoader):
        self.loader, self.batch_sampler = loader, loader.batch_sampler

    def __iter__(self):
        yield next(iter(self.loader))


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # batches already taken from the current epoch
    global_step: int = 0  # optimiser steps taken (skipped steps excluded; exact in checkpoints)
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
        world: World | None = None,
        interrupts: Interrupts | None = None,
        evaluator: Callable[..., tuple[dict[str, float], Any]] = evaluate,
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
        self._unwritable = False  # the last checkpoint write failed
        self.guard = guard
        self.log = log
        self.log_every_steps = log_every_steps
        self.metadata = metadata or {}
        self.world = world or World()
        self.is_main = self.world.is_main
        self.interrupts = interrupts or Interrupts()
        self.evaluator = evaluator  # (model, loader, device, amp_dtype, prefix=split) -> (metrics, records)
        self.flags = StepFlags()
        self._names: list[str] = []  # the loss components and "grad_norm", in the order of _sums
        self._sums: torch.Tensor | None = None  # this epoch's _names, summed over the kept steps
        self._kept: torch.Tensor | None = None  # and how many steps were kept
        self.state = TrainState()
        self.progress = self.is_main and sys.stderr.isatty()

    # -- one step -----------------------------------------------------------------------------
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimiser step, skipped on the device when the loss or the gradient norm is not finite.

        Returns the loss components and the gradient norm as device tensors; nothing here waits for
        the device (the health guard hears of a skipped step when the device has passed it).
        """
        self.model.train()
        _, losses = forward_loss(self.model, batch, self.device, self.amp_dtype)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        values = {**{k: v.detach() for k, v in losses.items()}, "grad_norm": norm.detach()}
        skip = self.world.any((~(torch.isfinite(values["loss"]) & torch.isfinite(norm))).float())
        if self.grad_clip:
            # A non-finite norm must not scale the gradients: that would smear NaN over all of them
            # and hide which parameter went bad (the step is skipped anyway).
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm.nan_to_num(0.0, 0.0, 0.0))
        step_unless(self.optimizer, skip)
        self.scheduler.step()
        kept = 1.0 - skip
        self._names = list(values)
        sums = torch.stack(list(values.values())).nan_to_num(0.0, 0.0, 0.0) * kept
        self._sums = sums if self._sums is None else self._sums + sums
        self._kept = kept if self._kept is None else self._kept + kept
        self.flags.put(batch, skip)
        self._check_health()
        return values

    def _check_health(self, wait: bool = False) -> None:
        """Count the steps the device has finished (all of them if `wait`): kept, or skipped as non-finite."""
        for batch, skipped in self.flags.ready(wait):
            if skipped:
                self.guard.bad(self.state.global_step, batch, self.core, lambda b=batch: self.core(b))
            else:
                self.guard.ok()
                self.state.global_step += 1

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
        self._sums = self._kept = None
        events = 0
        start = time.perf_counter()
        bar = tqdm(
            total=max(total, 0), desc=f"epoch {self.state.epoch}", disable=not self.progress, leave=False
        )
        with self.interrupts.deferred():  # a stop signal: finish the step, checkpoint, then stop
            for batch in itertools.islice(loader, max(total, 0)):
                batch = to_device(batch, self.device)
                values = self.train_step(batch)
                events += len(batch["event_index"])
                self.state.step_in_epoch += 1
                bar.update()
                at_log_step = self.state.step_in_epoch % self.log_every_steps == 0
                if at_log_step:
                    rate = events / (time.perf_counter() - start)
                    self._log_step(float(values["loss"]), rate, bar, first + total)
                stop, checkpoint = self._control(at_log_step)
                if stop:
                    self._stop()
                if checkpoint:
                    self.save("last.pt")
            if self.world.agree(self.interrupts.requested)[0]:
                self._stop()
        bar.close()
        self._check_health(wait=True)
        metrics = {}
        kept = 0.0 if self._kept is None else float(self._kept)
        if kept:
            metrics = {f"train/{k}": v / kept for k, v in zip(self._names, self._sums.tolist(), strict=True)}
        metrics["train/events_per_s"] = events / max(time.perf_counter() - start, 1e-9)
        metrics["health/nonfinite_steps"] = float(self.guard.total)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def _log_step(self, loss: float, rate: float, bar: tqdm, end: int) -> None:
        """The step's loss, read from the device (a host sync, every `log_every_steps`)."""
        self._check_health()  # after that read every finished step can be counted
        if not math.isfinite(loss):
            return
        bar.set_postfix(loss=f"{loss:.4f}", ev_s=f"{rate:.0f}")
        self.log({"train/step_loss": loss}, self.state.global_step)
        if self.is_main and not self.progress:  # no terminal (batch job, log file): progress as log lines
            log.info(
                "epoch %d batch %d/%d: loss %.4f, %.0f events/s",
                self.state.epoch,
                self.state.step_in_epoch,
                end,
                loss,
                rate,
            )

    def _control(self, at_log_step: bool) -> tuple[bool, bool]:
        """(stop, checkpoint) after this step: the same on every rank, which agree at the logging steps."""
        by_steps = bool(
            self.checkpoint_every_steps and self.state.step_in_epoch % self.checkpoint_every_steps == 0
        )
        by_time = bool(
            self.checkpoint_every_s and time.monotonic() - self._saved_at >= self.checkpoint_every_s
        )
        stop = self.interrupts.requested
        if self.world.size > 1:
            if not at_log_step:
                return False, by_steps
            stop, by_time = self.world.agree(stop, by_time)
        return stop, by_steps or by_time

    def _stop(self) -> None:
        """Checkpoint where training stands and stop (every rank at once): the run ends KILLED, ready to
        continue."""
        path = self.save("last.pt")
        self.world.close()
        where = f"epoch {self.state.epoch}, batch {self.state.step_in_epoch}"
        stop = stopped_by(
            self.interrupts.signum,  # None on a rank that the signal did not reach
            f"checkpoint {path} at {where}"
            if path
            else f"at {where}, no checkpoint could be written; the last one written holds the run",
        )
        if self.is_main:
            log.warning("%s", stop)
        raise stop

    def evaluate(self, split: str) -> tuple[dict[str, float], Any]:
        """Mean losses and metrics of a split, with the records behind them (per muon for the tracker,
        per hit for the hit filter)."""
        return self.evaluator(self.model, self.loaders[split], self.device, self.amp_dtype, prefix=split)

    def _require_monitor(self, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise ConfigError(
                f"optimized_metric={self.monitor!r} is not a metric of the epoch; choose one of "
                f"{sorted(k for k in metrics if k.startswith('val/'))}"
            )

    def check_monitor(self) -> None:
        """Fail before training if validation does not compute the monitored metric: one validation
        batch names them all. It leaves no trace (a DataLoader draws a seed from torch's RNG)."""
        with torch.random.fork_rng(devices=[]):
            metrics, _ = self.evaluator(
                self.model, _FirstBatch(self.loaders["val"]), self.device, self.amp_dtype, prefix="val"
            )
        self._require_monitor(metrics)

    def fit(self) -> float:
        """Train until max_epochs or early stopping; return the best monitored value."""
        self.check_monitor()
        while self.state.epoch < self.max_epochs and not self.state.finished:
            metrics = self.train_epoch()
            metrics.update(self.world.share(self.evaluate("val")[0] if self.is_main else None))
            self._require_monitor(metrics)
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
            "rng": self.world.gather(rng_state()),  # one per rank
            "world_size": self.world.size,
            "metadata": self.metadata,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = TrainState(**state["trainer"])
        self.guard.total = state["nonfinite_steps"]
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # before issue 15: rank 0's
        set_rng_state(rng[self.world.rank])

    def save(self, name: str) -> Path | None:
        """Write a checkpoint (rank 0); every rank calls it at the same steps (it gathers their RNG).
        A checkpoint that cannot be written (no room, no permission) is a warning, once until one is
        written again, and None: training goes on, since stopping would lose for sure what a kill only
        might."""
        path = self.checkpoint_dir / name
        self._check_health(wait=True)  # so that the step counts it records are exact
        state = self.state_dict()
        self._saved_at = time.monotonic()
        if not self.is_main:
            return path
        sidecar = {
            **self.metadata,
            "epoch": self.state.epoch,
            "global_step": self.state.global_step,
            "finished": self.state.finished,
        }
        try:
            save_checkpoint(path, state, sidecar)
        except OSError as err:
            if not self._unwritable:
                log.warning(
                    "cannot write the checkpoint %s (%s); training goes on, and a kill would lose what "
                    "was trained since the last checkpoint written",
                    path,
                    err.strerror or err,
                )
            self._unwritable = True
            return None
        if self._unwritable:
            log.info("checkpoint %s written again", path)
        self._unwritable = False
        return path

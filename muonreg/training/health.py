"""Numerical health guard: a non-finite step never updates the model, and persistent trouble is named.

Each step's loss and gradient norm are checked on the device, and a non-finite step is skipped
there (no optimiser update; muonreg.training.optim.step_unless), so the check costs no host sync.
The host learns of it a step or two later (StepFlags), when the device has passed it, and the
guard counts it and saves its batch with the model state for reproduction. After `max_consecutive`
such steps in a row training stops, naming the first module whose forward output went non-finite
on that batch (found with forward hooks), or the first parameter whose gradient did when the
forward pass is clean.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from muonreg.numerics import all_finite

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row."""


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def first_nonfinite_module(model: nn.Module, forward: Callable[[], object]) -> str | None:
    """Run `forward` with hooks on every module; return the first (in execution order) whose output is non-finite."""
    found: list[str] = []

    def hook(name: str):
        def check(module, inputs, output):
            if not found and any(t.is_floating_point() and not all_finite(t) for t in _tensors(output)):
                found.append(name or type(module).__name__)

        return check

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def first_nonfinite_grad(model: nn.Module) -> str | None:
    for name, param in model.named_parameters():
        if param.grad is not None and not all_finite(param.grad):
            return name
    return None


class StepFlags:
    """The "skipped" flags of steps the host has not looked at yet, with their batches.

    On CUDA a flag is copied to pinned host memory without waiting and read once an event recorded
    after it has completed, so the host never stalls the device for it; on the CPU it is ready at once.
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[dict, torch.Tensor, torch.cuda.Event | None]] = deque()

    def put(self, batch: dict[str, torch.Tensor], skipped: torch.Tensor) -> None:
        event = None
        if skipped.is_cuda:
            host = torch.empty(skipped.shape, dtype=skipped.dtype, pin_memory=True)
            skipped = host.copy_(skipped, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending.append((batch, skipped, event))

    def ready(self, wait: bool = False) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
        """(batch, skipped) of the steps the device has finished, in order (all of them if `wait`)."""
        while self._pending:
            batch, skipped, event = self._pending[0]
            if event is not None:
                if not (wait or event.query()):
                    return
                event.synchronize()
            self._pending.popleft()
            yield batch, bool(skipped)


class HealthGuard:
    def __init__(self, max_consecutive: int, dump_dir: Path | None):
        """`dump_dir`: where skipped batches are saved (None: only counted, e.g. on ranks other than 0)."""
        self.max_consecutive = max_consecutive
        self.dump_dir = None if dump_dir is None else Path(dump_dir)
        self.total = 0
        self.consecutive = 0

    def ok(self) -> None:
        self.consecutive = 0

    def bad(
        self,
        step: int,
        batch: dict[str, torch.Tensor],
        model: nn.Module,
        forward: Callable[[], object],
    ) -> None:
        """Record a skipped step; raise NonFiniteTrainingError once too many came in a row."""
        self.total += 1
        self.consecutive += 1
        dump = None
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            dump = self.dump_dir / f"nonfinite_step{step}.pt"
            batch_cpu = {k: v.cpu() for k, v in batch.items()}
            torch.save({"step": step, "batch": batch_cpu, "model": model.state_dict()}, dump)
            log.warning("non-finite loss or gradient at step %d: step skipped, batch saved to %s", step, dump)
        if self.consecutive < self.max_consecutive:
            return
        bad_grad = first_nonfinite_grad(model)
        module = first_nonfinite_module(model, forward)
        where = (
            f"the first module whose output went non-finite is '{module}'"
            if module
            else f"the forward pass is finite; the first non-finite gradient is in '{bad_grad}'"
        )
        raise NonFiniteTrainingError(
            f"{self.consecutive} consecutive non-finite training steps (last: step {step}); {where}."
            + (f" The offending batch and model state are in {dump}" if dump else "")
        )

"""Training throughput at the reference setting: events/s in steady state and peak resident memory.

    python bench/train_throughput.py [--steps 12] [--warmup 3] [--workers 2] [--batch 200] [--events 4000]
                                     [--multiplicity high|default] [--override key=value ...] [--profile]

Reference muon config (dim 32, 2 encoder + 2 decoder layers, 8 heads, 2 queries), float32,
batch 200, the shipped default model, on simulated events of 60-600 hits (mean ~330, gzip files;
generated once into bench/out), or with `--multiplicity default` the ~92-hit events `make train`
trains on. Real optimiser steps through the training loop with the DataLoader, so data waiting is
included. Prints `train_events_per_s` and `peak_rss_mib` (the whole job: this process and its
DataLoader workers together), and with `--profile` where a step's time goes (`step_forward_ms`,
`step_loss_ms`, `step_backward_ms`, then the forward per module and torch's op table).
"""

from __future__ import annotations

import collections
import itertools
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch
from common import arguments, bench_dataset, header
from hydra import compose, initialize_config_dir

from muonreg.config import project_root
from muonreg.evaluation.inference import forward_loss
from muonreg.training.device import autocast_dtype, release_freed_memory, to_device
from muonreg.training.health import HealthGuard
from muonreg.training.loop import Trainer
from muonreg.training.optim import build_optimizer, build_scheduler
from muonreg.training.setup import build_data, build_loaders, build_model, fit_normalizations


class TreeMemory:
    """Peak resident memory of this process and its DataLoader workers together, sampled from /proc.

    getrusage cannot add a worker's peak to its parent's, and RSS would count the pages a forked
    worker shares with its parent twice; the sum of proportional set sizes (PSS) sampled every
    100 ms is the memory the whole job holds.
    """

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _pss_kib(pid: int) -> int:
        """Proportional set size: pages shared with the forked workers are counted once in the sum."""
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            return 0

    def _tree(self, pid: int) -> list[int]:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return [pid]
        return [pid, *[p for c in children for p in self._tree(int(c))]]

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, sum(self._pss_kib(p) for p in self._tree(os.getpid())))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 1024


def profile(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> None:
    """Where a step's time goes, after the timed loop (its clocks would otherwise wait on each phase):
    forward, loss and backward; the forward per module, two levels deep; then torch's op table."""
    phases: dict[str, float] = collections.defaultdict(float)
    modules: dict[str, float] = collections.defaultdict(float)
    started: dict[str, float] = {}

    def enter(name: str):
        return lambda *_: started.__setitem__(name, time.perf_counter())

    def leave(name: str):
        return lambda *_: modules.__setitem__(name, modules[name] + time.perf_counter() - started[name])

    hooks = [
        hook
        for name, module in model.named_modules()
        if name and name.count(".") <= 1
        for hook in (module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave(name)))
    ]
    model.train()
    for batch in batches:
        t0 = time.perf_counter()
        outputs = model(batch)
        t1 = time.perf_counter()
        loss = model.loss(outputs, batch)["loss"]
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        for phase, seconds in (("forward", t1 - t0), ("loss", t2 - t1), ("backward", t3 - t2)):
            phases[phase] += seconds
    for hook in hooks:
        hook.remove()
    n, step = len(batches), sum(phases.values())
    events = sum(len(b["event_index"]) for b in batches)
    print(
        f"# profile: {n} batches of {events / n:.0f} events; ms per batch, share of forward + loss + backward"
    )
    for phase, seconds in phases.items():
        print(f"step_{phase}_ms: {seconds / n * 1e3:.1f}")
        print(f"# {phase} {seconds / step:.1%}")
    print("# forward per module, ms per batch (a parent includes its children)")
    for name, seconds in sorted(modules.items(), key=lambda kv: -kv[1]):
        if seconds / phases["forward"] >= 0.01:
            print(f"#   {name:50s} {seconds / n * 1e3:8.1f}  {seconds / phases['forward']:6.1%} of forward")
    with torch.profiler.profile() as prof:
        _, losses = forward_loss(model, batches[0], device, None)
        losses["loss"].backward()
    for line in prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15).splitlines():
        print(f"# {line}")


def main() -> None:
    parser = arguments(__doc__, events=4000)
    parser.add_argument("--steps", type=int, default=12, help="measured optimiser steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--multiplicity", choices=["high", "default"], default="high")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides, e.g. model.dim=64")
    parser.add_argument(
        "--profile", action="store_true", help="also print a torch profiler summary of one step"
    )
    args = parser.parse_args()
    path = bench_dataset(args.events, args.multiplicity, seed=args.seed)
    header(sys.argv)
    release_freed_memory()
    overrides = [
        f"data.path={path}",
        f"trainer.batch_size={args.batch}",
        f"trainer.num_workers={args.workers}",
        "trainer.device=cpu",
        *args.override,
    ]
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    torch.manual_seed(0)
    data = build_data(cfg, progress=False)
    model = build_model(cfg, data.features)
    fit_normalizations(model, data.datasets["train"], list(cfg.inverse_fields.targets))
    device = torch.device("cpu")
    loaders = build_loaders(cfg, data, device)
    optimizer = build_optimizer(model, cfg.trainer.lr, cfg.trainer.weight_decay)
    trainer = Trainer(
        model,
        optimizer,
        build_scheduler(optimizer, 1000),
        loaders,
        device=device,
        amp_dtype=autocast_dtype(device, cfg.trainer.precision),
        checkpoint_dir=project_root() / "bench/out/checkpoints",
        guard=HealthGuard(5, project_root() / "bench/out/nonfinite"),
    )
    memory = TreeMemory()
    batches = iter(loaders["train"])
    hits = events = 0
    start = waited = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start, waited = time.perf_counter(), 0.0
        before = time.perf_counter()
        batch = to_device(next(batches), device)
        waited += time.perf_counter() - before
        trainer.train_step(batch)
        if step >= args.warmup:
            events += len(batch["event_index"])
            hits += int(batch["hit_valid"].sum())
    elapsed = time.perf_counter() - start
    print(
        f"# {args.steps} steps after {args.warmup} warm-up, {hits / events:.0f} hits/event, {torch.get_num_threads()} threads"
    )
    print(f"train_events_per_s: {events / elapsed:.1f}")
    print(f"data_wait_fraction: {waited / elapsed:.3f}")
    print(f"peak_rss_mib: {memory.stop():.0f}")
    print(
        f"# main process alone: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    if args.profile:
        profile(model, [to_device(b, device) for b in itertools.islice(loaders["train"], 5)], device)


if __name__ == "__main__":
    main()

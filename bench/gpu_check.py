"""The first GPU run, in one command: what the CPU cannot tell (bench/RESULTS.md, "GPU: the first runs").

    python bench/gpu_check.py [--events 4000] [--batch 200] [--steps 30] [--warmup 5] [--workers 8]
                              [--compile] [--no-smoke] [--override key=value ...]

1. machine: the GPU, its compute capability, the precision `trainer.precision=auto` picks, TF32;
2. attention, for every config in conf/model: the scaled-dot-product-attention kernel a forward pass
   runs by default (profiler op names), and which backends accept it under
   torch.nn.attention.sdpa_kernel(...) in the run's precision;
3. training at batch 200 (trainer=gpu) on 60-600-hit events (bench.common.bench_dataset): events/s
   of Trainer.train_step with the DataLoader, torch.cuda.max_memory_allocated, host syncs per step
   (CUDA sync debug mode: where the host waits for the device), then validation at the evaluation
   batch size (events/s, peak memory) and a checkpoint written and read back (CUDA RNG included);
4. precision: on one batch, the regression outputs in bf16 autocast and in TF32 float32 against
   strict float32, per matched muon (relative pT, eta, phi; all muons and those above 50 GeV);
5. `python train.py debug=smoke trainer=gpu` to a finished run, when mlflow and matplotlib are
   installed (skipped with a line otherwise).

Output: `name: value` lines (`SKIPPED (why)` where a figure needs CUDA), `#` comments; datasets and
checkpoints go to bench/out (or $MUONREG_BENCH_OUT). Also runs on CPU, which is how it is tested.
Imports: torch, numpy, h5py, scipy, pyyaml, tqdm, and hydra-core + omegaconf + antlr4-python3-runtime
(all three pure Python) to compose the training config exactly as train.py does; not mlflow.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from common import OUT, arguments, bench_dataset, header
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.nn.attention import SDPBackend, sdpa_kernel

from muonreg.config import project_root
from muonreg.training.checkpoint import load_checkpoint
from muonreg.training.device import allow_tf32, ampere_or_newer, autocast, autocast_dtype, to_device
from muonreg.training.health import HealthGuard
from muonreg.training.loop import Trainer
from muonreg.training.optim import build_optimizer, build_scheduler
from muonreg.training.setup import build_data, build_loaders, build_model, fit_normalizations

CUDA = torch.cuda.is_available()
NO_CUDA = "SKIPPED (no CUDA device)"
SDPA_OPS = {  # aten op -> kernel
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
}


def show(name: str, value: object) -> None:
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def mib(nbytes: int) -> float:
    return nbytes / 2**20


# -- 1. machine ---------------------------------------------------------------------------------
def machine(device: torch.device, cfg: DictConfig) -> torch.dtype | None:
    amp = autocast_dtype(device, str(cfg.trainer.precision))
    show("device", torch.cuda.get_device_name(device) if CUDA else f"CPU ({torch.get_num_threads()} threads)")
    show(
        "cuda",
        f"{torch.version.cuda}, capability {torch.cuda.get_device_capability(device)}" if CUDA else NO_CUDA,
    )
    show("precision_auto", "float32" if amp is None else str(amp).removeprefix("torch."))
    show("tf32_matmul", "on" if ampere_or_newer(device) and cfg.trainer.tf32 else "off")
    return amp


# -- 2. attention -------------------------------------------------------------------------------
def attention(overrides: list[str], data, batch: dict, device: torch.device, amp: torch.dtype | None) -> None:
    for name in sorted(p.stem for p in (project_root() / "conf" / "model").glob("*.yaml")):
        model_cfg = config([*overrides, f"model={name}"])
        model = build_model(model_cfg, data.features).to(device).eval()
        m = model_cfg.model
        print(f"# model={name}: dim {m.dim}, {m.heads} heads (head dim {m.dim // m.heads})")
        with (
            torch.no_grad(),
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
        ):
            run_forward(model, batch, device, amp)
        kernels = Counter(
            SDPA_OPS[e.key] for e in prof.key_averages() if e.key in SDPA_OPS for _ in range(e.count)
        )
        show(f"sdpa_default[{name}]", ", ".join(f"{k} x{n}" for k, n in kernels.items()) or "none found")
        for backend in (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.MATH,
        ):
            show(f"sdpa_{backend.name.lower()}[{name}]", _accepts(backend, model, batch, device, amp))


def run_forward(model: torch.nn.Module, batch: dict, device: torch.device, amp: torch.dtype | None) -> dict:
    with autocast(device, amp):
        return model(batch)


def _accepts(backend: SDPBackend, model, batch: dict, device: torch.device, amp: torch.dtype | None) -> str:
    try:
        with torch.no_grad(), sdpa_kernel(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch explains at length why a kernel declines
            run_forward(model, batch, device, amp)
    except RuntimeError as err:
        return "refused (" + str(err).strip().splitlines()[0][:100] + ")"
    return "ok"


# -- 3. training, validation, checkpoint --------------------------------------------------------
def endless(loader) -> Iterator[dict]:
    """The loader's batches, epoch after epoch: a small dataset must not end the timed steps."""
    while True:
        yield from loader


def training(trainer: Trainer, loader, args, device: torch.device) -> None:
    batches = endless(loader)
    events, hits = (
        0,
        torch.zeros((), dtype=torch.int64, device=device),
    )  # summed on the device: no sync per step
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize()
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        batch = to_device(next(batches), device)
        trainer.train_step(batch)
        if step >= args.warmup:
            events += len(batch["event_index"])
            hits += batch["hit_valid"].sum()
    synchronize()
    elapsed = time.perf_counter() - start
    print(
        f"# {args.steps} steps of batch {args.batch} after {args.warmup} warm-up, "
        f"{int(hits) / events:.0f} hits/event"
    )
    show("train_events_per_s", events / elapsed)
    show("train_peak_mib", mib(torch.cuda.max_memory_allocated()) if CUDA else NO_CUDA)
    show("nonfinite_steps", trainer.guard.total)
    if not CUDA:
        show("host_syncs_per_step", NO_CUDA)
        return
    places: Counter[str] = Counter()
    steps = 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                trainer.train_step(to_device(next(batches), device))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            places[f"{Path(w.filename).name}:{w.lineno}"] += 1
    show("host_syncs_per_step", sum(places.values()) / steps)
    for place, n in places.most_common():
        print(f"#   {n / steps:g} per step at {place}")


def validation(trainer: Trainer, n_events: int) -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    start = time.perf_counter()
    metrics, _ = trainer.evaluate("val")
    synchronize()
    show("eval_events_per_s", n_events / (time.perf_counter() - start))
    show("eval_peak_mib", mib(torch.cuda.max_memory_allocated()) if CUDA else NO_CUDA)
    show("val_loss", metrics["val/loss"])


def checkpoint_round_trip(trainer: Trainer) -> None:
    state = load_checkpoint(trainer.save("last.pt"))
    trainer.load_state_dict(state)
    show("checkpoint_cuda_rng", ("saved" if "cuda" in state["rng"][0] else "MISSING") if CUDA else NO_CUDA)


# -- 4. precision -------------------------------------------------------------------------------
def precision(model, batch: dict, device: torch.device, tf32: bool) -> None:
    """Regression outputs of bf16 autocast and of TF32 float32 against strict float32, per matched muon."""
    model.eval()

    def predict(amp: torch.dtype | None, with_tf32: bool, perm: torch.Tensor | None = None):
        allow_tf32(device, with_tf32)
        with torch.no_grad():
            out = {
                k: v.float() if v.is_floating_point() else v
                for k, v in run_forward(model, batch, device, amp).items()
            }
            perm = model.match(out, batch) if perm is None else perm
            return model.predict(model.align(out, perm), batch["hit_valid"]), perm

    reference, perm = predict(None, False)
    valid = batch["particle_valid"]
    pt = batch["particle_truthMuon_pt"][valid]

    def muons(predicted: dict, field: str) -> torch.Tensor:  # per truth muon, from its matched query
        return predicted[f"track_truthMuon_{field}"][:, : valid.shape[1]][valid]

    variants: dict[str, Callable] = {"bf16": lambda: predict(torch.bfloat16, False, perm)[0]}
    variants["tf32"] = (lambda: predict(None, True, perm)[0]) if ampere_or_newer(device) else None
    for name, run in variants.items():
        if run is None:
            show(f"{name}_pt_rel_diff_median", "SKIPPED (needs an Ampere or newer GPU)")
            continue
        got = run()
        rel = (muons(got, "pt") / muons(reference, "pt") - 1).abs()
        for label, keep in (("", torch.ones_like(pt, dtype=torch.bool)), ("_above50", pt > 50)):
            values = rel[keep].double().cpu().numpy()
            if len(values):
                show(f"{name}_pt_rel_diff_median{label}", float(np.median(values)))
                show(f"{name}_pt_rel_diff_p95{label}", float(np.quantile(values, 0.95)))
        for field in ("eta", "phi"):
            diff = (muons(got, field) - muons(reference, field)).abs()
            show(f"{name}_{field}_abs_diff_p95", float(diff.double().quantile(0.95)))
    print(f"# {int(valid.sum())} muons, {int((pt > 50).sum())} above 50 GeV")
    allow_tf32(device, tf32)


# -- 5. the real thing --------------------------------------------------------------------------
def smoke_run(out: Path) -> None:
    missing = [m for m in ("mlflow", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        show("smoke_run", f"SKIPPED (train.py needs {', '.join(missing)})")
        return
    cmd = [sys.executable, "train.py", "debug=smoke", "trainer=gpu", f"paths.root={out}"]
    result = subprocess.run(cmd, cwd=project_root(), capture_output=True, text=True, timeout=600)
    show("smoke_run", "finished" if result.returncode == 0 else f"FAILED (exit {result.returncode})")
    tail = result.stdout if result.returncode == 0 else result.stdout + result.stderr
    for line in tail.strip().splitlines()[-6:]:
        print(f"#   {line}")


def main() -> None:
    parser = arguments(__doc__, events=4000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=8 if CUDA else 2, help="DataLoader workers")
    parser.add_argument("--no-smoke", action="store_true", help="skip the train.py smoke run")
    parser.add_argument("--compile", action="store_true", help="train torch.compile(model, dynamic=True)")
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        help="extra Hydra overrides, e.g. data.path=DIR (then nothing is simulated)",
    )
    args = parser.parse_args()
    header(sys.argv)
    overrides = ["trainer=gpu", f"trainer.batch_size={args.batch}", *args.override]
    if not any(o.startswith("data.path=") for o in args.override):
        overrides.insert(0, f"data.path={bench_dataset(args.events, seed=args.seed)}")
    cfg = config([*overrides, f"trainer.num_workers={args.workers}"])
    device = torch.device("cuda" if CUDA else "cpu")
    amp = machine(device, cfg)
    allow_tf32(device, cfg.trainer.tf32)

    torch.manual_seed(0)
    data = build_data(cfg, progress=False)
    loaders = build_loaders(cfg, data, device)
    attention(overrides, data, to_device(next(iter(loaders["train"])), device), device, amp)

    model = build_model(cfg, data.features)
    fit_normalizations(model, data.datasets["train"], list(cfg.inverse_fields.targets))
    model.to(device)
    optimizer = build_optimizer(model, cfg.trainer.lr, cfg.trainer.weight_decay)
    OUT.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=OUT))
    trainer = Trainer(
        torch.compile(model, dynamic=True) if args.compile else model,
        optimizer,
        build_scheduler(optimizer, args.warmup + args.steps + 3),
        loaders,
        device=device,
        amp_dtype=amp,
        checkpoint_dir=out / "checkpoints",
        guard=HealthGuard(cfg.trainer.max_consecutive_nonfinite, out / "nonfinite"),
    )
    training(trainer, loaders["train"], args, device)
    validation(trainer, len(data.datasets["val"]))
    checkpoint_round_trip(trainer)
    precision(model, to_device(next(iter(loaders["val"])), device), device, cfg.trainer.tf32)
    if not args.no_smoke:
        smoke_run(out / "smoke")


if __name__ == "__main__":
    main()

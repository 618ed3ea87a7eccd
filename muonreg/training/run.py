"""`train(cfg)`: one complete run — validate, build, train, test, and record it all in MLflow."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
from pathlib import Path

import mlflow
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from muonreg.config import flatten, validate
from muonreg.evaluation.full import full_evaluation
from muonreg.tracking.runs import job_run
from muonreg.training import distributed
from muonreg.training.checkpoint import config_hash, find_resumable, load_checkpoint
from muonreg.training.device import autocast_dtype, release_freed_memory, resolve_device
from muonreg.training.health import HealthGuard
from muonreg.training.loop import Trainer
from muonreg.training.optim import build_optimizer, build_scheduler
from muonreg.training.setup import build_data, build_loaders, build_model, fit_normalizations

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def output_dir() -> Path:
    """This job's Hydra output directory (or ./outputs/interactive outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return (
        Path(HydraConfig.get().runtime.output_dir)
        if HydraConfig.initialized()
        else Path("outputs/interactive")
    )


def _resume_path(cfg: DictConfig, cfg_hash: str) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        found = find_resumable([cfg.paths.outputs, cfg.paths.multirun], cfg_hash)
        log.info("resume=auto: %s", found or "no unfinished run of this config; starting fresh")
        return found
    return Path(str(cfg.resume))


def _interrupt_on_sigterm() -> None:
    """Batch schedulers stop jobs with SIGTERM: turn it into KeyboardInterrupt, so the MLflow run
    ends KILLED (not RUNNING forever) and `resume=auto` continues from the last checkpoint."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def train(cfg: DictConfig) -> float:
    """Train, validate and test one configuration; return the best value of `cfg.optimized_metric`.

    The MLflow run opens right after validation, so any later failure (unreadable data, a
    non-finite stop) leaves the run FAILED rather than missing.
    """
    validate(cfg)
    _interrupt_on_sigterm()
    release_freed_memory()
    world = distributed.setup()
    cfg_hash = config_hash(cfg)
    resume = _resume_path(cfg, cfg_hash)
    state = load_checkpoint(resume) if resume else None
    run_context = job_run(cfg, resume_run_id=state["metadata"]["mlflow_run_id"] if state else None)
    with run_context if world.is_main else contextlib.nullcontext() as run:
        if run is not None and state is None:
            mlflow.log_params(flatten(cfg))
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
            mlflow.set_tags({"config_hash": cfg_hash})
        best = _train_and_test(cfg, world, state, resume, run, cfg_hash)
    world.close()
    return best


def _train_and_test(
    cfg: DictConfig,
    world: distributed.World,
    state: dict | None,
    resume: Path | None,
    run: mlflow.ActiveRun | None,
    cfg_hash: str,
) -> float:
    seed_everything(cfg.seed)
    device = world.device or resolve_device(str(cfg.trainer.device))
    data = build_data(cfg, progress=world.is_main)
    model = build_model(cfg, data.features)
    fit_normalizations(model, data.datasets["train"], list(cfg.inverse_fields.targets))
    model.to(device)
    if run is not None:
        mlflow.set_tags({"dataset": str(data.path), "device": str(device)})

    loaders = build_loaders(cfg, data, device, world.rank, world.size)
    steps = len(loaders["train"].batch_sampler)
    if cfg.trainer.max_steps_per_epoch is not None:
        steps = min(steps, cfg.trainer.max_steps_per_epoch)
    optimizer = build_optimizer(model, cfg.trainer.lr, cfg.trainer.weight_decay)
    scheduler = build_scheduler(optimizer, steps * cfg.trainer.max_epochs)
    net = world.wrap(model)
    if cfg.trainer.compile:
        net = torch.compile(net, dynamic=True)  # batch shapes vary with hit counts

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        if run is not None:
            mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)

    out = output_dir()
    trainer = Trainer(
        net,
        optimizer,
        scheduler,
        loaders,
        device=device,
        amp_dtype=autocast_dtype(device, cfg.trainer.precision),
        grad_clip=cfg.trainer.grad_clip,
        max_epochs=cfg.trainer.max_epochs,
        max_steps_per_epoch=cfg.trainer.max_steps_per_epoch,
        patience=cfg.trainer.early_stopping_patience,
        monitor=cfg.optimized_metric,
        checkpoint_dir=out / "checkpoints",
        checkpoint_every_steps=cfg.trainer.checkpoint_every_steps,
        guard=HealthGuard(cfg.trainer.max_consecutive_nonfinite, out / "nonfinite"),
        log=log_metrics,
        log_every_steps=cfg.trainer.log_every_steps,
        metadata={
            "config_hash": cfg_hash,
            "mlflow_run_id": run.info.run_id if run else None,
            "config": OmegaConf.to_container(cfg, resolve=True),
        },
        is_main=world.is_main,
    )
    if state is not None:
        trainer.load_state_dict(state)
        log.info(
            "resumed from %s at epoch %d, batch %d", resume, trainer.state.epoch, trainer.state.step_in_epoch
        )
    best = trainer.fit()
    if not world.is_main:  # the test evaluation, report and artifacts are rank 0's
        return best

    best_path = out / "checkpoints" / "best.pt"
    if best_path.is_file():
        trainer.core.load_state_dict(load_checkpoint(best_path)["model"])
    test = data.datasets["test"]
    if len(test):
        test_metrics, text = full_evaluation(
            trainer.model,
            loaders["test"],
            test,
            device,
            trainer.amp_dtype,
            cfg.evaluation,
            cfg.paths.data,
            out / "evaluation",
        )
        log_metrics(test_metrics, trainer.state.epoch)
        log.info(
            "test split, %d events:\n%s\ntracking: efficiency %.3f, fake rate %.3f, hit efficiency %.3f, "
            "hit purity %.3f\nreport: %s%s",
            len(test),
            text,
            test_metrics["test/track_efficiency"],
            test_metrics["test/fake_rate"],
            test_metrics["test/hit_efficiency"],
            test_metrics["test/hit_purity"],
            out / "evaluation" / "resolution.md",
            f"\nMLflow run {run.info.run_id}: `make ui` and open http://127.0.0.1:5000" if run else "",
        )
    if run is not None:
        _log_artifacts(cfg, out, best_path)
    return best


def _log_artifacts(cfg: DictConfig, out: Path, best_path: Path) -> None:
    for name in (".hydra", "evaluation"):
        if (out / name).is_dir():
            mlflow.log_artifacts(str(out / name), name)
    if cfg.tracking.log_checkpoint and best_path.is_file():
        mlflow.log_artifact(str(best_path), "checkpoints")

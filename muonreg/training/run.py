"""`train(cfg)`: one complete run — validate, build, train, test, and record it all in MLflow."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from muonreg.config import ConfigError, flatten, is_hit_filter, validate
from muonreg.data.dataset import MuonEventDataset
from muonreg.evaluation.calibration import calibrate_uncertainty
from muonreg.evaluation.filter_evaluation import evaluate_filter, filter_evaluation, set_validation_cuts
from muonreg.evaluation.full import full_evaluation
from muonreg.evaluation.inference import evaluate
from muonreg.tracking.runs import job_run, tracking_uri
from muonreg.tracking.sink import TrackingSink
from muonreg.tracking.store import connect, warn_if_shared_sqlite
from muonreg.training import distributed
from muonreg.training.checkpoint import config_hash, load_checkpoint, replace_model
from muonreg.training.device import (
    allow_tf32,
    autocast_dtype,
    evaluation_dtype,
    release_freed_memory,
    resolve_device,
)
from muonreg.training.health import HealthGuard
from muonreg.training.interrupts import Interrupts
from muonreg.training.loop import Trainer
from muonreg.training.optim import build_optimizer, build_scheduler
from muonreg.training.rundir import RunDir, find_resumable, resume_target
from muonreg.training.setup import (
    RunData,
    build_data,
    build_loaders,
    build_model,
    eval_loader,
    evaluation_sets,
    fit_normalizations,
    set_evaluation,
)

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


def _requeued() -> bool:
    """A SLURM job started again by the scheduler (pre-emption, or `scontrol requeue`)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0


def _claim_run_dir(cfg: DictConfig, cfg_hash: str) -> RunDir:
    """The run directory this job works in, locked: the run to resume, or a fresh one (Hydra's).

    A job that finds a run of its own config in its own output directory continues it, or, finished,
    has nothing to do: that is a requeued submitit job, which SLURM starts again with the same
    arguments, or a job of a sweep run again in the same `hydra.sweep.dir` (killed sweeps are finished
    so, with or without `resume=auto`). A requeued job of your own sbatch script (new directory)
    resumes as with `resume=auto`.
    """
    client = connect(tracking_uri(cfg))  # a store that does not answer fails here, before any rank trains
    here = RunDir(output_dir())
    if cfg.resume in (None, "auto") and here.record:
        return _continue_in_place(here, cfg_hash)
    resume = cfg.resume if cfg.resume is not None or not _requeued() else "auto"
    if resume is not None:
        if resume != "auto":
            return resume_target(Path(str(resume)), client)
        found = find_resumable([cfg.paths.outputs, cfg.paths.multirun], cfg_hash, client)
        log.info(
            "resume=auto: %s", found.path if found else "no unfinished run of this config; starting fresh"
        )
        if found is not None:
            return found
    here.acquire()
    return here


def _continue_in_place(here: RunDir, cfg_hash: str) -> RunDir:
    where = f"the output directory {here.path} already holds a run"
    if here.record.get("config_hash") != cfg_hash:
        raise ConfigError(f"{where} of another configuration; give this one its own hydra.run.dir")
    if not here.acquire():
        raise ConfigError(f"{where}, which a live process is training")
    if not here.record.get("done"):
        log.info("continuing the unfinished run in %s (a requeued job, or a sweep run again)", here.path)
    return here


@contextlib.contextmanager
def _logging_into(path: Path) -> Iterator[None]:
    """A resumed run logs into its own directory too, not only into this invocation's Hydra dir."""
    if path.resolve() == output_dir().resolve():
        yield
        return
    handler = logging.FileHandler(path / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def train(cfg: DictConfig) -> float:
    """Train, validate and test one configuration; return the best value of `cfg.optimized_metric`.

    The run lives in one directory from start to end, however often it is killed and resumed
    (muonreg.training.rundir). The MLflow run opens before any data is read, so a later failure
    (unreadable data, a non-finite stop) leaves it FAILED rather than missing. The directory is
    marked done only once MLflow has been told FINISHED (or the message is waiting in the run's
    tracking buffer), so a done run is never resumed and an unfinished one always is.
    """
    validate(cfg)
    release_freed_memory()
    world = distributed.setup()
    cfg_hash = config_hash(cfg)
    run_dir: RunDir | None = None

    def claim() -> tuple[Path, Path | None, float | None]:
        nonlocal run_dir
        run_dir = _claim_run_dir(cfg, cfg_hash)
        record = run_dir.record
        return run_dir.path, run_dir.checkpoint, record.get("best", math.nan) if record.get("done") else None

    with Interrupts().installed() as interrupts:  # scheduler signals: checkpoint, stop, requeue
        path, checkpoint, finished_best = world.from_main(claim)
        if finished_best is not None:  # a finished run is never written to again
            log.info("%s holds this job's finished run: nothing to do", path)
            if run_dir is not None:
                run_dir.release()
            world.close()
            return finished_best
        try:
            state = load_checkpoint(checkpoint) if checkpoint else None
            resume_id = run_dir.record.get("mlflow_run_id") if run_dir else None
            with (
                _logging_into(path) if world.is_main else contextlib.nullcontext(),
                job_run(cfg, path, resume_id) if world.is_main else contextlib.nullcontext() as sink,
            ):
                if sink is not None:
                    warn_if_shared_sqlite(sink.uri, world.size)
                if sink is not None and resume_id is None:
                    run_dir.write(
                        config_hash=cfg_hash, mlflow_run_id=sink.run_id, tracking_uri=sink.uri, done=False
                    )
                    sink.log_params(flatten(cfg))
                    sink.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
                    sink.set_tags({"config_hash": cfg_hash, "muonreg.run_dir": str(path.resolve())})
                elif sink is not None:
                    log.info(
                        "continuing run %s (MLflow run %s) from %s",
                        path,
                        resume_id,
                        checkpoint or "its start",
                    )
                best = _train_and_test(cfg, world, state, path, sink, cfg_hash, interrupts)
            if run_dir is not None:
                run_dir.write(done=True, best=best)  # best: what a sweeper hears if the job runs again
        finally:
            if run_dir is not None:
                run_dir.release()
    return best


def check_world_size(state: dict, size: int, run: Path) -> None:
    """A run continues with as many processes as it was trained by: its position in the epoch and its
    learning-rate schedule count each process's batches."""
    trained = state.get("world_size", 1)
    if trained != size:
        raise ConfigError(
            f"the checkpoint of {run} was trained by {trained} process(es) and this job has {size}: "
            f"continue it with {trained} (torchrun --nproc_per_node, SLURM tasks), or start a fresh run"
        )


def _train_and_test(
    cfg: DictConfig,
    world: distributed.World,
    state: dict | None,
    out: Path,
    sink: TrackingSink | None,
    cfg_hash: str,
    interrupts: Interrupts,
) -> float:
    if state is not None:
        check_world_size(state, world.size, out)
    seed_everything(cfg.seed)  # the same initial model on every rank
    device = world.device or resolve_device(str(cfg.trainer.device))
    allow_tf32(device, cfg.trainer.tf32)
    data = build_data(cfg, progress=world.is_main)
    model = build_model(cfg, data.features)
    fit_normalizations(
        model,
        data.datasets["train"],
        list(cfg.inverse_fields.targets),
        standardize_inputs=cfg.model.get("standardize_inputs", True),
    )
    model.to(device)
    if world.size > 1:
        seed_everything(world.rank_seed(cfg.seed))  # but each rank its own random numbers
    if sink is not None:
        # the intra-op thread count changes float summation order, hence the trained network (README)
        sink.set_tags(
            {"dataset": str(data.path), "device": str(device), "torch_threads": str(torch.get_num_threads())}
        )

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
        if sink is not None:
            sink.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step)

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
        checkpoint_every_minutes=cfg.trainer.checkpoint_every_minutes,
        guard=HealthGuard(
            cfg.trainer.max_consecutive_nonfinite, out / "nonfinite" if world.is_main else None
        ),
        log=log_metrics,
        log_every_steps=cfg.trainer.log_every_steps,
        metadata={
            "config_hash": cfg_hash,
            "mlflow_run_id": sink.run_id if sink else None,
            "config": OmegaConf.to_container(cfg, resolve=True),
        },
        world=world,
        interrupts=interrupts,
        evaluator=(
            functools.partial(evaluate_filter, working_points=tuple(cfg.model.working_points))
            if is_hit_filter(cfg)
            else evaluate
        ),
    )
    if state is not None:
        trainer.load_state_dict(state)
        log.info(
            "resumed at epoch %d, batch %d%s",
            trainer.state.epoch,
            trainer.state.step_in_epoch,
            "; training had finished: on to the test evaluation" if trainer.state.finished else "",
        )
    best = trainer.fit()
    log_metrics({f"best/{cfg.optimized_metric}": best}, trainer.state.epoch)  # what a sweeper optimised
    world.close()  # all ranks leave together, none waits while rank 0 alone tests
    if not world.is_main:  # the test evaluation, report and artifacts are rank 0's
        return best

    best_path = out / "checkpoints" / "best.pt"
    if best_path.is_file():
        trainer.core.load_state_dict(load_checkpoint(best_path)["model"])
    dtype = evaluation_dtype(device, cfg)
    sets = evaluation_sets(cfg, data, progress=False)
    # What is set on validation after training travels with the weights (the checkpoint, the MLflow
    # model, ONNX): the filter's working-point cuts, the tracker's per-track uncertainty calibration
    # (on the validation set: its ~4x the val split's muons per pT bin make the widths come out 1 on
    # sets the calibration never saw, where the val split's ~90 muons at 100-200 GeV gave 0.77-0.91).
    if is_hit_filter(cfg):
        changed = len(data.datasets["val"]) > 0
        if changed:
            cuts = set_validation_cuts(trainer.core, loaders["val"], device, dtype)
            log.info("working points' cuts, set on the validation split: %s", cuts)
    else:
        validation = eval_loader(cfg, sets["validation"], device)
        calibration = calibrate_uncertainty(trainer.model, validation, device, dtype)
        log_metrics(calibration, trainer.state.epoch)
        changed = bool(calibration)
    if changed and best_path.is_file():
        replace_model(best_path, trainer.core.state_dict())
    evaluate_sets = _evaluate_filter if is_hit_filter(cfg) else _evaluate_tracker
    message = evaluate_sets(cfg, trainer, data, sets, loaders["test"], device, dtype, out, log_metrics)
    try:
        if sink is not None:
            _log_artifacts(cfg, out, best_path, sink, data)
    finally:  # last, after the artifacts' logging, and shown even when that fails: what a newcomer reads
        if message:
            ui = f"\nMLflow run {sink.run_id}: `make ui` and open http://127.0.0.1:5000" if sink else ""
            log.info("%s%s", message, ui)
    return best


def _evaluate_filter(
    cfg: DictConfig,
    trainer: Trainer,
    data: RunData,
    evaluated: dict[str, MuonEventDataset],
    test_loader: torch.utils.data.DataLoader,
    device: torch.device,
    dtype: torch.dtype | None,
    out: Path,
    log_metrics: Callable[[dict[str, float], int], None],
) -> str:
    """The hit filter at its stored cuts on the test split (test/...) and the held-out set
    (heldout/...), each logged and reported; return the readable summary."""
    sets = {"test": (data.datasets["test"], test_loader, out / "evaluation")}
    heldout = evaluated.get("heldout")
    if heldout is not None:
        sets["heldout"] = (heldout, eval_loader(cfg, heldout, device), out / "evaluation" / "heldout")
    lines = []
    for name, (dataset, loader, report) in sets.items():
        if not len(dataset):
            continue
        metrics, text = filter_evaluation(
            trainer.model,
            loader,
            dataset,
            device,
            dtype,
            list(cfg.model.working_points),
            list(cfg.evaluation.eta_bins),
            report,
            prefix=name,
        )
        log_metrics(metrics, trainer.state.epoch)
        lines += [
            f"{'test split' if name == 'test' else 'held-out detector'}:",
            text,
            f"report: {report / 'hit_filter.md'}",
        ]
    return "\n".join(lines)


def _evaluate_tracker(
    cfg: DictConfig,
    trainer: Trainer,
    data: RunData,
    evaluated: dict[str, MuonEventDataset],
    test_loader: torch.utils.data.DataLoader,
    device: torch.device,
    dtype: torch.dtype | None,
    out: Path,
    log_metrics: Callable[[dict[str, float], int], None],
) -> str:
    """The chosen checkpoint on the test split (test/...), the validation set (validation/...) and the
    held-out set (heldout/...), each logged and reported; return the readable summary."""
    lines, reports = [], []
    test = data.datasets["test"]
    if len(test):
        metrics, text = full_evaluation(
            trainer.model,
            test_loader,
            test,
            device,
            dtype,
            cfg.evaluation,
            cfg.paths.data,
            out / "evaluation",
        )
        log_metrics(metrics, trainer.state.epoch)
        lines += [
            f"test split, {len(test)} events:",
            text,
            f"tracking: efficiency {metrics['test/track_efficiency']:.3f}, fake rate "
            f"{metrics['test/fake_rate']:.3f}, hit efficiency {metrics['test/hit_efficiency']:.3f}, "
            f"hit purity {metrics['test/hit_purity']:.3f}",
        ]
        reports.append(out / "evaluation" / "resolution.md")
    for name, dataset in evaluated.items():
        metrics, text = full_evaluation(
            trainer.model,
            eval_loader(cfg, dataset, device),
            dataset,
            device,
            dtype,
            set_evaluation(cfg, name),
            cfg.paths.data,
            out / "evaluation" / name,
            prefix=name,
        )
        log_metrics(metrics, trainer.state.epoch)
        if name == "heldout":
            h = cfg.evaluation.heldout
            lines += [
                f"held-out detector, {len(dataset)} events (seed {h.seed}, alignment seed {h.alignment_seed}, "
                f"energy-loss shift {h.energy_loss_shift:+g}):",
                text,
                f"tracking: efficiency {metrics['heldout/track_efficiency']:.3f}, hit purity "
                f"{metrics['heldout/hit_purity']:.3f}",
            ]
            reports.append(out / "evaluation" / name / "resolution.md")
    return "\n".join([*lines, "report: " + ", ".join(map(str, reports))])


def _log_artifacts(cfg: DictConfig, out: Path, best_path: Path, sink: TrackingSink, data: RunData) -> None:
    for name in (".hydra", "evaluation"):
        if (out / name).is_dir():
            sink.log_artifacts(out / name, name)
    if cfg.tracking.log_checkpoint and best_path.is_file():
        sink.log_artifacts(best_path, "checkpoints")
    if cfg.tracking.get("log_model", False) and best_path.is_file():
        _log_model(cfg, out, best_path, sink, data)


def _log_model(cfg: DictConfig, out: Path, best_path: Path, sink: TrackingSink, data: RunData) -> None:
    """The best network as an MLflow model (tracking/model.py), registered if tracking.register_as."""
    from muonreg.tracking.model import ARTIFACT, save_model, stored_events

    start = time.perf_counter()
    model_dir = out / "mlflow-model"
    shutil.rmtree(model_dir, ignore_errors=True)  # a resumed run that died while writing it
    split = data.datasets["test"] if len(data.datasets["test"]) else data.datasets["val"]
    example = stored_events(split.reader, split.indices[:2])
    save_model(best_path, data.features.columns, model_dir, example)
    sink.log_artifacts(model_dir, ARTIFACT)
    if cfg.tracking.get("register_as"):
        sink.register_model(ARTIFACT, str(cfg.tracking.register_as))
    log.info("MLflow model %s written in %.1f s", model_dir, time.perf_counter() - start)

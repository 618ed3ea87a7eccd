"""MLflow runs of training jobs: the store they go to, how they are named, how they open and close.

A job's run is created (or, resumed, reopened) in the job's process, as a child of the sweep's
parent run inside a multirun, and every write to it goes through a TrackingSink, so a tracking
fault mid-run never stops training. The run always ends: FINISHED, FAILED on an exception, KILLED
on Ctrl-C or a scheduler's SIGTERM (ready to resume).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import DictConfig

from muonreg.errors import root_cause
from muonreg.tracking.liveness import heartbeat_tag
from muonreg.tracking.sink import TrackingSink
from muonreg.tracking.store import TrackingError, connect, default_tracking_uri

PARENT_FILE = "mlflow_parent_run_id"  # written into a multirun's sweep dir by the sweep callback
# Tag on a sweep's parent run, + a run id: a job of this sweep continued that run (resume), which
# stays with the sweep that started it.
CONTINUED = "muonreg.continued."
BUFFER_FILE = "tracking-buffer.jsonl"  # records the store did not take, in the run directory


def tracking_uri(cfg: DictConfig) -> str:
    """The environment wins, then `tracking.uri`, then `<paths.root>/mlflow.db`."""
    if cfg.tracking.uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        return str(cfg.tracking.uri)
    return default_tracking_uri(cfg.paths.root)


def setup_experiment(cfg: DictConfig) -> tuple[MlflowClient, str]:
    """A client on the configured store and the experiment id (created if new)."""
    uri = tracking_uri(cfg)
    client = connect(uri)
    mlflow.set_tracking_uri(uri)
    name = str(cfg.tracking.experiment)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return client, experiment.experiment_id
    # Local stores keep artifacts beside the database; a server decides for itself.
    location = (
        (Path(cfg.paths.root).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
    )
    try:
        return client, client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created by a parallel job meanwhile
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return client, experiment.experiment_id


def job_overrides() -> tuple[list[str], int | None, str | None]:
    """(task overrides, job number, sweep dir) of the running Hydra job; empty outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return [], None, None
    hc = HydraConfig.get()
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    return list(hc.overrides.task), (hc.job.num if multirun else None), (hc.sweep.dir if multirun else None)


def parent_run_id(sweep_dir: str | None) -> str | None:
    """The sweep's parent run, created by MlflowSweepCallback before any job started."""
    if sweep_dir is None:
        return None
    path = Path(sweep_dir) / PARENT_FILE
    return path.read_text().strip() if path.is_file() else os.environ.get("MUONREG_PARENT_RUN_ID")


@contextmanager
def job_run(cfg: DictConfig, run_dir: Path, resume_run_id: str | None = None) -> Iterator[TrackingSink]:
    """The MLflow run of one training job, written through a sink buffering into `run_dir`."""
    client, experiment_id = setup_experiment(cfg)
    uri = tracking_uri(cfg)
    try:
        if resume_run_id:
            client.update_run(resume_run_id, status="RUNNING")
            run_id = resume_run_id
            parent = parent_run_id(job_overrides()[2])
            if parent and client.get_run(run_id).data.tags.get(MLFLOW_PARENT_RUN_ID) != parent:
                client.set_tag(parent, CONTINUED + run_id, "resume")
        else:
            overrides, job_num, sweep_dir = job_overrides()
            name = ",".join(o for o in overrides if not o.startswith(("tracking.", "paths."))) or "default"
            tags = {"overrides": " ".join(overrides) or "(none)", **heartbeat_tag()}
            if job_num is not None:
                tags["hydra.job.num"] = str(job_num)
            parent = parent_run_id(sweep_dir)
            if parent:
                tags[MLFLOW_PARENT_RUN_ID] = parent
            run_id = client.create_run(experiment_id, run_name=name, tags=resolve_tags(tags)).info.run_id
    except mlflow.exceptions.MlflowException as err:
        raise TrackingError(f"MLflow tracking store {uri}: cannot open the run ({root_cause(err)})") from err
    sink = TrackingSink(client, run_id, uri, run_dir / BUFFER_FILE, resumed=resume_run_id is not None)
    status = "FAILED"
    try:
        yield sink
        status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl-C or a scheduler's SIGTERM: stopped, not broken
        status = "KILLED"
        raise
    finally:
        sink.close(status)

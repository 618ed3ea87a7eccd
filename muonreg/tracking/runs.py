"""MLflow runs of training jobs: where they are stored, how they are named, what they log.

The default store is an absolute `sqlite:///<root>/mlflow.db` (MLflow's file store is gone in
3.x), so a job's working directory never matters; `MLFLOW_TRACKING_URI` in the environment wins,
so a team's `mlflow server` needs no config edit. Runs are always opened with
`with mlflow.start_run(...)`, which marks them FAILED if the body raises.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from muonreg.config import project_root

PARENT_FILE = "mlflow_parent_run_id"  # written into a multirun's sweep dir by the sweep callback


def default_tracking_uri(root: str | Path | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else the SQLite database at the project root (or `root`)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(root or project_root()).resolve() / 'mlflow.db'}"


def tracking_uri(cfg: DictConfig) -> str:
    """The environment wins, then `tracking.uri`, then `<paths.root>/mlflow.db`."""
    if cfg.tracking.uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        return str(cfg.tracking.uri)
    return default_tracking_uri(cfg.paths.root)


def setup_experiment(cfg: DictConfig) -> str:
    """Point MLflow at the configured store and return the experiment id (created if new)."""
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    name = str(cfg.tracking.experiment)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # Local stores keep artifacts beside the database; a server decides for itself.
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    location = (Path(cfg.paths.root).resolve() / "mlartifacts").as_uri() if local else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created by a parallel job meanwhile
        return client.get_experiment_by_name(name).experiment_id


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
def job_run(cfg: DictConfig, resume_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """The MLflow run of one training job: a child of the sweep's parent run inside a multirun."""
    experiment_id = setup_experiment(cfg)
    overrides, job_num, sweep_dir = job_overrides()
    name = ",".join(o for o in overrides if not o.startswith(("tracking.", "paths."))) or "default"
    tags = {"overrides": " ".join(overrides) or "(none)"}
    if job_num is not None:
        tags["hydra.job.num"] = str(job_num)
    kwargs = (
        {"run_id": resume_run_id} if resume_run_id else {"experiment_id": experiment_id, "run_name": name}
    )
    with mlflow.start_run(
        parent_run_id=None if resume_run_id else parent_run_id(sweep_dir), tags=tags, **kwargs
    ) as run:
        try:
            yield run
        except KeyboardInterrupt:  # Ctrl-C or a scheduler's SIGTERM: stopped, not broken
            mlflow.end_run("KILLED")
            raise

"""Hydra callback that gives a multirun one MLflow parent run, created before any job starts.

Creating the database, the experiment and the parent run in the launching process means parallel
jobs (joblib, submitit) never race on SQLite schema creation, and every job finds its parent in
`<sweep dir>/mlflow_parent_run_id`. The sweep dir is made before the parent run, so an unwritable
`hydra.sweep.dir` fails the sweep without leaving a parent behind. Hydra skips `on_multirun_end` when a job fails, so the parent
is also closed at interpreter exit: FINISHED only if the sweep ended normally and every child
FINISHED, FAILED otherwise; it never stays RUNNING. A job that continues a run of an earlier sweep
(`resume=auto`) leaves that run with its own sweep and tags this parent with it (`CONTINUED`).

`torchrun ... train.py -m` runs the sweep in every rank, each job together: only rank 0 makes the
parent, and the jobs run one after another (the basic launcher). A SLURM sweep on a SQLite store is
refused before anything is submitted (muonreg.tracking.store: SQLite on a shared filesystem).
A sweep run again in the same `hydra.sweep.dir` (a resumed Optuna search) continues its parent run.
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from muonreg.errors import exit_on_user_errors
from muonreg.tracking.runs import CONTINUED, PARENT_FILE, setup_experiment, tracking_uri
from muonreg.tracking.store import SERVER_HOWTO, TrackingError, sqlite_file
from muonreg.training import distributed

log = logging.getLogger(__name__)


def _sweep_name(config: DictConfig) -> str:
    overrides = [o for o in config.hydra.overrides.task if not o.startswith(("tracking.", "paths."))]
    return "sweep: " + (" ".join(overrides) or "(defaults)")


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.client: MlflowClient | None = None
        self.completed = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with exit_on_user_errors():  # Hydra would turn an exception into a warning and sweep on
            self._open_parent(config)

    def _open_parent(self, config: DictConfig) -> None:
        from muonreg.config import ConfigError, validate
        from muonreg.training.setup import dataset_path

        validate(config)
        launcher = str(config.hydra.launcher._target_)
        world = distributed.launch()
        if world.size > 1 and not launcher.endswith(".BasicLauncher"):
            raise ConfigError(
                f"-m under torchrun or SLURM tasks ({world.size} processes) runs its jobs one after another, "
                "all ranks together: drop the hydra/launcher override (the basic launcher does that)"
            )
        if world.rank != 0:
            return  # the sweep's parent run is rank 0's
        uri = tracking_uri(config)
        if launcher.endswith(".SlurmLauncher") and sqlite_file(uri) is not None:
            raise TrackingError(
                f"hydra/launcher=slurm with the SQLite tracking store {uri}: SQLite on a cluster's shared "
                f"filesystem breaks under concurrent jobs ('database is locked', corruption). To sweep on "
                f"SLURM, {SERVER_HOWTO}"
            )
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"hydra.sweep.dir={str(sweep_dir)!r} cannot be created ({err})") from err
        dataset_path(config)  # generate the shared default dataset once, before jobs start
        self.client, experiment_id = setup_experiment(config)
        self.parent_id = (
            self._reopen(sweep_dir, experiment_id)
            or self.client.create_run(
                experiment_id,
                run_name=_sweep_name(config),
                tags={"sweep_dir": str(sweep_dir), "muonreg.role": "sweep"},
            ).info.run_id
        )
        atexit.register(self._close)  # from here on the parent is closed however the sweep ends
        (sweep_dir / PARENT_FILE).write_text(self.parent_id)
        os.environ["MUONREG_PARENT_RUN_ID"] = self.parent_id
        log.info("MLflow parent run %s (experiment %s)", self.parent_id, config.tracking.experiment)

    def _reopen(self, sweep_dir: Path, experiment_id: str) -> str | None:
        """The parent run of an earlier sweep in this same directory (a resumed search), set RUNNING again."""
        previous = sweep_dir / PARENT_FILE
        if not previous.is_file():
            return None
        try:
            run = self.client.get_run(previous.read_text().strip())
        except MlflowException:
            return None  # made in another tracking store
        if run.info.experiment_id != experiment_id:
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        log.info("continuing the MLflow parent run %s of %s", run.info.run_id, sweep_dir)
        return run.info.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.completed = True
        self._close()

    def _close(self) -> None:
        if self.parent_id is None:
            return
        client = self.client
        parent = client.get_run(self.parent_id)
        if parent.info.status != "RUNNING":
            return
        children = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'"
        )
        # runs of earlier sweeps that this sweep's jobs continued (resume) count as its jobs
        continued = [client.get_run(k[len(CONTINUED) :]) for k in parent.data.tags if k.startswith(CONTINUED)]
        jobs = children + continued
        ok = self.completed and jobs and all(r.info.status == "FINISHED" for r in jobs)
        client.set_terminated(self.parent_id, "FINISHED" if ok else "FAILED")
        log.info("MLflow parent run %s: %s", self.parent_id, "FINISHED" if ok else "FAILED")

"""A run's directory: the one place a run lives, across however many processes train it.

`run.json` records which MLflow run the directory feeds, the config hash and whether the run is
done (trained, tested, everything logged). `run.lock` is held by the process working on the run
for as long as it lives; the kernel drops the lock when that process dies, however it dies, kill -9
included. So `resume=auto` can tell a run whose process died (lock free) from one still training
(lock held), and two processes never continue the same run. It is a POSIX record lock (lockf),
which belongs to the process alone: a BSD flock would be shared with forked DataLoader workers,
which outlive a killed parent by seconds and would make a dead run look alive.

Which state wins: MLflow says FINISHED only after the run is complete, and `done` is written
right after; a run is resumed only when neither says it is complete, and a `done` missing behind
a FINISHED run (a kill between the two) is repaired on sight.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from muonreg.config import ConfigError
from muonreg.errors import root_cause

log = logging.getLogger(__name__)

RECORD, LOCK = "run.json", "run.lock"


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock: IO | None = None

    @property
    def record(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / RECORD).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def write(self, **fields: Any) -> None:
        """Update run.json atomically."""
        tmp = self.path / (RECORD + ".tmp")
        tmp.write_text(json.dumps({**self.record, **fields}, indent=1))
        os.replace(tmp, self.path / RECORD)

    @property
    def checkpoint(self) -> Path | None:
        last = self.path / "checkpoints" / "last.pt"
        return last if last.is_file() else None

    def acquire(self) -> bool:
        """Take the run's lock for this process's lifetime; False if a live process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK, "w")  # noqa: SIM115 (held open until release or exit)
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: another process holds it
            handle.close()
            return False
        self._lock = handle
        return True

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def finished_in(self, client: MlflowClient) -> bool:
        """True when the run is complete, by run.json or by its MLflow run (repairing run.json);
        raises MlflowException when the store does not hold its MLflow run."""
        record = self.record
        if record.get("done"):
            return True
        if record.get("mlflow_run_id") and client.get_run(record["mlflow_run_id"]).info.status == "FINISHED":
            self.write(done=True)
            return True
        return False


def _activity(path: Path) -> float:
    """When a run directory last changed: its record or its last checkpoint."""
    last = path.parent / "checkpoints" / "last.pt"
    return max(path.stat().st_mtime, last.stat().st_mtime if last.is_file() else 0.0)


def find_resumable(search_dirs: list[str | Path], cfg_hash: str, client: MlflowClient) -> RunDir | None:
    """The most recently active unfinished run of this config that no live process holds, locked."""
    records = [p for root in search_dirs for p in Path(root).glob(f"**/{RECORD}")]
    for path in sorted(records, key=_activity, reverse=True):
        run = RunDir(path.parent)
        record = run.record
        if record.get("config_hash") != cfg_hash or record.get("done"):
            continue
        if not run.acquire():
            log.info("resume=auto: %s is being trained by a live process; not taken", run.path)
            continue
        try:
            if not run.finished_in(client):
                return run
        except MlflowException as err:
            log.warning(
                "resume=auto: %s is not taken, its MLflow run cannot be read (%s)", run.path, root_cause(err)
            )
        run.release()
    return None


def resume_target(checkpoint: Path, client: MlflowClient) -> RunDir:
    """The run directory of `resume=PATH` (the checkpoint's `checkpoints/` parent), locked."""
    run = RunDir(checkpoint.resolve().parent.parent)
    where = f"resume={str(checkpoint)!r}"
    if not (run.path / RECORD).is_file():
        raise ConfigError(f"{where} is not a checkpoint of a run directory (no {run.path / RECORD})")
    if not run.acquire():
        raise ConfigError(f"{where}: its run {run.path} is being trained by a live process")
    try:
        finished = run.finished_in(client)
    except MlflowException as err:
        run.release()
        raise ConfigError(f"{where}: its MLflow run cannot be read ({root_cause(err)})") from err
    if finished:
        run.release()
        raise ConfigError(
            f"resume={str(checkpoint)!r}: its run {run.path} is finished, and a finished run is never "
            "resumed; start a new run (no resume), or evaluate it with python -m muonreg.evaluate"
        )
    return run

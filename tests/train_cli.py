"""Running `python train.py` as a user does, in a directory of its own, and reading its MLflow runs back.

The end-to-end tests' shared helpers (their fixtures are in conftest.py). A run started by `run_train`
or `signal_when` finds an MLflow database whose schema is made already (a copy of one made once per
test session: MLflow's migrations take ~10 s a database); `command` alone leaves the directory as it
is, for the tests of what a fresh database does.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from muonreg.config import project_root

if TYPE_CHECKING:
    import mlflow

ROOT = project_root()
# One intra-op thread: on a shared 2-core machine more only spin against the other processes.
ENV = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "OMP_NUM_THREADS": "1"}


@functools.cache
def mlflow_template() -> Path:
    """An MLflow SQLite database with its schema made and nothing in it, made once per process."""
    from muonreg.tracking.store import connect

    folder = Path(tempfile.mkdtemp(prefix="muonreg-mlflow-template-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    connect(f"sqlite:///{folder / 'mlflow.db'}")
    return folder / "mlflow.db"


def with_database(root: Path) -> Path:
    """`root` with an empty MLflow database (the template's copy) unless it has one."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "mlflow.db").exists():
        shutil.copy(mlflow_template(), root / "mlflow.db")
    return root


def command(root: Path, data: Path, *overrides: str, multirun: bool = False) -> list[str]:
    flags = ["-m"] if multirun else []
    return [
        sys.executable,
        "train.py",
        *flags,
        "debug=smoke",
        f"paths.root={root}",
        f"paths.data={data}",
        *overrides,
    ]


def run_train(
    root: Path, data: Path, *overrides: str, multirun: bool = False, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = command(with_database(root), data, *overrides, multirun=multirun)
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{result.stderr[-4000:]}")
    return result


def client(root: Path) -> mlflow.MlflowClient:
    import mlflow  # here: the unit tests never pay for its import

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def runs(root: Path) -> list:
    c = client(root)
    return c.search_runs([c.get_experiment_by_name("muonreg").experiment_id])


def split(all_runs: list) -> tuple[list, list]:
    parents = [r for r in all_runs if r.data.tags.get("muonreg.role") == "sweep"]
    return parents, [r for r in all_runs if r not in parents]


def last_sidecar(root: Path) -> dict:
    """The newest last.pt sidecar of the run directories under `root` ({} before the first)."""
    found = sorted(root.glob("outputs/**/checkpoints/last.pt.json"), key=lambda p: p.stat().st_mtime)
    with contextlib.suppress(IndexError, OSError, ValueError):  # none yet, or caught mid-write
        return json.loads(found[-1].read_text())
    return {}


def signal_when(
    root: Path,
    data: Path,
    overrides: list[str],
    ready: Callable[[], bool],
    signum: int = signal.SIGKILL,
    group: bool = False,
) -> tuple[int, str]:
    """Start a run, send it (or, `group`, its whole process group, as a terminal's Ctrl-C does) `signum`
    as soon as `ready()` holds, failing if it ended first; return its exit status and stderr."""
    proc = subprocess.Popen(
        command(with_database(root), data, *overrides),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # as from a terminal: a test run started in the background would hand down an ignored SIGINT
        preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal"
    (os.killpg if group else os.kill)(proc.pid, signum)
    stderr = proc.communicate(timeout=120)[1]
    return proc.returncode, stderr

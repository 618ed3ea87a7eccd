"""The MLflow store a run is recorded in: its URI, checked before anything starts, and safe first use.

The default is an absolute `sqlite:///<root>/mlflow.db` (MLflow's file store is gone in 3.x), so a
job's working directory never matters; `MLFLOW_TRACKING_URI` in the environment wins, so a team's
`mlflow server` needs no config edit. Every user of the store goes through `connect`, which turns
the ways a store is unusable into one-line TrackingErrors naming the URI:

- a plain path (`/tmp/x`, `file:...`), which MLflow would take for its retired file store;
- a server that cannot be reached, or that accepts connections but does not answer an HTTP request,
  within PROBE_TIMEOUT_S (MLflow itself waits 120 s per attempt and retries for minutes);
- a fresh SQLite file: MLflow creates its schema on first use, and two processes doing so at
  once make one of them fail (`table ... already exists`). A file lock next to the database
  serialises that first use across processes, so any number of sweeps and jobs can start together.

SQLite is for one machine: on a cluster's shared filesystem (NFS, Lustre) its file locks are
unreliable, and dozens of jobs writing at once get "database is locked" or a corrupted file. A SLURM
sweep is therefore refused on SQLite (muonreg.tracking.sweep), and a job running under SLURM or on
several nodes warns loudly; both say how to start a tracking server (SERVER_HOWTO).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

from muonreg.config import project_root
from muonreg.errors import UserError, root_cause
from muonreg.locking import exclusive

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
SOURCES = "MLFLOW_TRACKING_URI, tracking.uri or --tracking-uri"
SERVER_HOWTO = (
    "start a tracking server once, on a host the compute nodes reach (e.g. a login node): "
    "mlflow server --backend-store-uri sqlite:///$HOME/mlflow/mlflow.db --artifacts-destination "
    "$HOME/mlflow/artifacts --host 0.0.0.0 --port 5000 (or a PostgreSQL backend for a team), then "
    "export MLFLOW_TRACKING_URI=http://<that host>:5000 before launching (README: GPU and clusters)"
)


PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
# Libraries that log every failed attempt, with a traceback, and their schema checks, on their own.
NOISY_LOGGERS = ("mlflow.store.db.utils", "urllib3.connectionpool", "mlflow.utils.rest_utils")
_QUIET_THREADS: set[int] = set()


class _NotFromAQuietThread(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread not in _QUIET_THREADS


for _name in NOISY_LOGGERS:
    logging.getLogger(_name).addFilter(_NotFromAQuietThread())


@contextmanager
def quiet_store_logs() -> Iterator[None]:
    """In this thread, drop the libraries' own logs of the store (NOISY_LOGGERS): for a caller that
    reports a failing store itself, in one line."""
    thread = threading.get_ident()
    _QUIET_THREADS.add(thread)
    try:
        yield
    finally:
        _QUIET_THREADS.discard(thread)


class TrackingError(UserError, RuntimeError):
    """The MLflow store cannot be used; the message names its URI."""


def default_tracking_uri(root: str | Path | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else the SQLite database at the project root (or `root`)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(root or project_root()).resolve() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:` URI (None for other stores and in-memory SQLite)."""
    if not uri.startswith("sqlite:"):
        return None
    database = make_url(uri).database
    return Path(database).resolve() if database and database != ":memory:" else None


def check_uri(uri: str) -> None:
    """Fail fast, naming the URI, on a plain path or a server that cannot be reached or does not answer."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # one letter: a Windows drive
        path = Path(parsed.path or uri).resolve()
        raise TrackingError(
            f"tracking URI {uri!r} ({SOURCES}) is a plain path, which MLflow reads as its retired file "
            f"store; use a database file, e.g. sqlite:///{path.with_suffix('.db')}, or a server, "
            "http://host:port"
        )
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        fix = f"point {SOURCES} at a reachable store (unset, runs go to the project's mlflow.db)"
        try:
            socket.create_connection((parsed.hostname, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as err:
            raise TrackingError(
                f"MLflow tracking server {uri} cannot be reached ({err}); start it, or {fix}"
            ) from err
        _probe_http(uri, fix)


def _probe_http(uri: str, fix: str) -> None:
    """Any HTTP answer within PROBE_TIMEOUT_S (an error status included: the server is alive, and MLflow
    names the problem); silence means a hung server or something that is not one."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors
        if isinstance(getattr(err, "reason", err), ssl.SSLError):
            return  # it answered; a certificate MLflow is told to trust (or not) is MLflow's business
        raise TrackingError(
            f"MLflow tracking server {uri} does not answer within {PROBE_TIMEOUT_S:.0f} s "
            f"({getattr(err, 'reason', err)}); restart it, or {fix}"
        ) from err


def cluster_job(world_size: int) -> str | None:
    """What makes this job a cluster job (SLURM, or processes on several nodes), or None."""
    if "SLURM_JOB_ID" in os.environ:
        return f"SLURM job {os.environ['SLURM_JOB_ID']}"
    if int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) < world_size:  # torchrun over several nodes
        return f"{world_size} processes on several nodes"
    return None


def warn_if_shared_sqlite(uri: str, world_size: int) -> None:
    """Warn loudly when a cluster job records into a SQLite file (training itself is never at risk:
    muonreg.tracking.sink retries and keeps what the store refuses)."""
    job = cluster_job(world_size)
    if job and sqlite_file(uri) is not None:
        log.warning(
            "%s records into the SQLite file %s: on a shared filesystem concurrent jobs get "
            "'database is locked' or corrupt it. To record cluster runs safely, %s",
            job,
            sqlite_file(uri),
            SERVER_HOWTO,
        )


@contextmanager
def creation_lock(uri: str) -> Iterator[None]:
    """Hold `<database>.lock` while a SQLite store may create its schema; a no-op for servers."""
    database = sqlite_file(uri)
    if database is None:
        yield
        return
    with exclusive(database.with_name(database.name + ".lock")):
        yield


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """Without MLflow's progress bar per artifact transfer: noise between a command's own lines."""
    before = os.environ.get(PROGRESS_BAR)
    os.environ[PROGRESS_BAR] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PROGRESS_BAR)
        else:
            os.environ[PROGRESS_BAR] = before


def connect(uri: str) -> MlflowClient:
    """A client whose store is ready (schema created, server answering), or a TrackingError."""
    check_uri(uri)
    with creation_lock(uri):
        try:
            client = MlflowClient(uri)  # builds the store (once per process): schema creation happens here
            client.search_experiments(max_results=1)
        except Exception as err:  # MLflow, SQLAlchemy and requests each raise their own kinds
            raise TrackingError(f"MLflow tracking store {uri} cannot be used: {root_cause(err)}") from err
    return client

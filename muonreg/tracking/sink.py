"""Every MLflow write of a run, made so that a tracking fault never stops or slows the training.

Training hands records (metrics, params, tags, artifacts, the final status) to the sink and goes
on. Each record is first appended to the run directory's RecordBuffer, so a record is on disk
before the checkpoint that follows it and a kill never loses one; one background thread then
writes the records to the store, in order, and empties the file whenever it has caught up.

When the store refuses a write (a locked or read-only SQLite file, a server gone away; a locked
SQLite file takes MLflow's 20 s busy timeout to say so) the sink warns once, naming the store, and
retries every RETRY_EVERY_S while training goes on; the records wait, in order, in memory and in
the file. MLflow's own per-attempt error logs (with tracebacks) are dropped from the writer thread
(store.quiet_store_logs).
Records the store never took stay in the file, and `close` says what they are and how to replay
them. A resumed run's sink first writes what its killed predecessor left in the file, and skips
metric points the store already holds (muonreg.tracking.records.Watermarks). The same thread
refreshes the run's heartbeat (muonreg.tracking.liveness). Nothing here knows about training, so
other callers (cluster and GPU jobs) reuse it as it is.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from muonreg.errors import root_cause
from muonreg.tracking.liveness import HEARTBEAT_S, heartbeat_tag
from muonreg.tracking.records import Record, RecordBuffer, Watermarks, apply, describe, metrics_record
from muonreg.tracking.store import quiet_store_logs

log = logging.getLogger(__name__)

RETRY_EVERY_S = 15.0  # how often a store that refused a write is tried again
CLOSE_TIMEOUT_S = 60.0  # how long the end of a run waits for the writer
THREAD = "mlflow-sink"


class TrackingSink:
    """Writes the records of one MLflow run from a background thread, keeping them until written."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        uri: str,
        buffer_path: Path,
        *,
        resumed: bool = False,
        retry_every_s: float = RETRY_EVERY_S,
    ):
        self.client, self.run_id, self.uri = client, run_id, uri
        self.buffer = RecordBuffer(buffer_path, run_id, uri)
        self.retry_every_s = retry_every_s
        self._pending = collections.deque(self.buffer.records())  # left by a killed predecessor
        self._recorded = Watermarks()
        self._watermarks_loaded = not (resumed or self._pending)
        self._failing = False
        self._warned = False
        self._closing = False
        self._last_beat = 0.0
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._work, name=THREAD, daemon=True)
        self._thread.start()

    # -- what training calls: a file append, never a wait on the store -------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put(metrics_record(metrics, step))

    def log_params(self, params: dict[str, str]) -> None:
        self._put({"op": "params", "params": params})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put({"op": "tags", "tags": tags})

    def log_text(self, text: str, path: str) -> None:
        self._put({"op": "text", "text": text, "path": path})

    def log_artifacts(self, local: Path, path: str | None = None) -> None:
        """A file or a directory; it must stay in place until written (the run directory does)."""
        self._put({"op": "artifacts", "local": str(local), "path": path})

    def register_model(self, path: str, name: str) -> None:
        """Register the run's model artifact `path` under `name`, once the records before it are in."""
        self._put({"op": "register", "path": path, "name": name})

    def close(self, status: str) -> bool:
        """End the run with `status` once the writer is through; True if the store got everything."""
        self._put({"op": "status", "status": status})
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join(CLOSE_TIMEOUT_S)
        with self._changed:
            left = list(self._pending)
            self.buffer.keep(left)  # exactly what the store does not have yet
        if left:
            log.warning(
                "MLflow run %s: not recorded in %s: %s. They are kept in %s; once the store is back, "
                "replay them with: python -m muonreg.tracking.replay %s",
                self.run_id,
                self.uri,
                describe(left),
                self.buffer.path,
                self.buffer.path,
            )
        return not left

    def _put(self, record: Record) -> None:
        with self._changed:
            self.buffer.append(record)
            self._pending.append(record)
            self._changed.notify()

    # -- the writer thread --------------------------------------------------------------------
    def _work(self) -> None:
        with quiet_store_logs():  # the sink reports a failing store itself, once
            self._write_all()

    def _write_all(self) -> None:
        while True:
            with self._changed:
                if not self._pending:
                    if self._closing:
                        return
                    self._changed.wait(timeout=HEARTBEAT_S / 4)
                record = self._pending[0] if self._pending else None
            if not self._failing and time.monotonic() - self._last_beat >= HEARTBEAT_S:
                self._beat()
            if record is None:
                continue
            if self._write(record):
                with self._changed:
                    self._pending.popleft()
                    if not self._pending:  # caught up: the file holds nothing the store lacks
                        self.buffer.keep([])
            elif self._closing:  # the store did not come back before the end of the run
                return
            else:
                with self._changed:
                    self._changed.wait_for(lambda: self._closing, timeout=self.retry_every_s)

    def _write(self, record: Record) -> bool:
        """Write one record; False when the store refused it."""
        try:
            if not self._watermarks_loaded:
                self._recorded.load(self.client, self.run_id)
                self._watermarks_loaded = True
            fresh = self._recorded.fresh(record)
            if fresh is not None:
                apply(self.client, self.run_id, fresh)
                self._recorded.mark(fresh)
        except Exception as err:  # MLflow, SQLAlchemy and requests each raise their own kinds
            self._fail(err)
            return False
        if self._failing:
            log.info("MLflow store %s is back: writing the waiting records of run %s", self.uri, self.run_id)
        self._failing = False
        return True

    def _beat(self) -> None:
        self._last_beat = time.monotonic()
        try:
            apply(self.client, self.run_id, {"op": "tags", "tags": heartbeat_tag()})
        except Exception as err:
            self._fail(err)

    def _fail(self, err: Exception) -> None:
        self._failing = True
        if not self._warned:
            self._warned = True
            log.warning(
                "MLflow store %s is not accepting writes (%s); training goes on: the records of run %s "
                "are kept in %s and written when the store answers again",
                self.uri,
                root_cause(err),
                self.run_id,
                self.buffer.path,
            )

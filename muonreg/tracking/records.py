"""What a training run writes to MLflow, as plain records: applied to a store, or kept in a file.

A record is a JSON-able dict with an "op": metrics, params, tags, text, artifacts, register (a
model version from a logged model) or status. The
sink keeps every record in a RecordBuffer, a JSONL file in the run directory whose first line
names the run and the store, until the store has it; what a killed process or a store that never
came back left there, the next process of the run or `python -m muonreg.tracking.replay FILE`
applies later, in order.

A resumed run recomputes the steps after its checkpoint exactly, so it may log a step the store
already holds; `Watermarks` drops a metric at or below the last step recorded for its key, so
that neither resuming nor replaying ever records a point twice.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

Record = dict[str, Any]


def metrics_record(metrics: dict[str, float], step: int) -> Record:
    return {
        "op": "metrics",
        "metrics": {k: float(v) for k, v in metrics.items()},
        "step": int(step),
        "time": int(time.time() * 1000),
    }


def apply(client: MlflowClient, run_id: str, record: Record) -> None:
    """Write one record to the store (raises whatever the store raises)."""
    op = record["op"]
    if op == "metrics":
        metrics = [Metric(k, v, record["time"], record["step"]) for k, v in record["metrics"].items()]
        client.log_batch(run_id, metrics=metrics)
    elif op in ("params", "tags"):
        kind = Param if op == "params" else RunTag
        items = [kind(k, str(v)) for k, v in record[op].items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, **{op: items[i : i + MAX_PARAMS_TAGS_PER_BATCH]})
    elif op == "text":
        client.log_text(run_id, record["text"], record["path"])
    elif op == "artifacts":
        local = Path(record["local"])
        if local.is_dir():
            client.log_artifacts(run_id, str(local), record["path"])
        else:
            client.log_artifact(run_id, str(local), record["path"])
    elif op == "register":
        register(client, run_id, record["path"], record["name"])
    elif op == "status":
        client.set_terminated(run_id, record["status"])
    else:
        raise ValueError(f"unknown tracking record {op!r}")


def register(client: MlflowClient, run_id: str, path: str, name: str) -> None:
    """A new version of registered model `name` (created if new) from the run's artifact `path`."""
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{path}"
    client.create_model_version(name, source, run_id=run_id)


class Watermarks:
    """The last recorded step of each metric key of one run."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}

    def load(self, client: MlflowClient, run_id: str) -> None:
        """Start from what the store holds (a resumed or replayed run)."""
        for key in client.get_run(run_id).data.metrics:
            self.steps[key] = max(m.step for m in client.get_metric_history(run_id, key))

    def fresh(self, record: Record) -> Record | None:
        """The record without the metric points already recorded (None if none is left)."""
        if record["op"] != "metrics":
            return record
        step = record["step"]
        kept = {k: v for k, v in record["metrics"].items() if step > self.steps.get(k, -math.inf)}
        return {**record, "metrics": kept} if kept else None

    def mark(self, record: Record) -> None:
        """Count a written record's metric points as recorded."""
        if record["op"] == "metrics":
            self.steps.update(dict.fromkeys(record["metrics"], record["step"]))


class RecordBuffer:
    """Records the store has not accepted yet, in a JSONL file (first line: run id and store)."""

    def __init__(self, path: Path, run_id: str, uri: str):
        self.path, self.run_id, self.uri = Path(path), run_id, uri

    @classmethod
    def open(cls, path: Path) -> RecordBuffer:
        with open(path) as f:
            header = json.loads(f.readline())
        return cls(path, header["run_id"], header["tracking_uri"])

    def append(self, record: Record) -> None:
        new = not self.path.is_file()
        with open(self.path, "a") as f:
            if new:
                f.write(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri}) + "\n")
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[Record]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()[1:]
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a process killed mid-write
                continue
        return out

    def keep(self, records: list[Record]) -> None:
        """Leave only `records` in the file (removed when none is left)."""
        if not records:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        header = {"run_id": self.run_id, "tracking_uri": self.uri}
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [header, *records]))
        os.replace(tmp, self.path)


def replay(client: MlflowClient, buffer: RecordBuffer) -> None:
    """Apply the buffered records in order, skipping points the store already holds (an earlier
    replay may have stopped half-way); on a failure keep the rest in the file and raise."""
    records = buffer.records()
    recorded = Watermarks()
    recorded.load(client, buffer.run_id)
    for done, record in enumerate(records):
        fresh = recorded.fresh(record)
        if fresh is None:
            continue
        try:
            apply(client, buffer.run_id, fresh)
        except Exception:
            buffer.keep(records[done:])
            raise
        recorded.mark(fresh)
    buffer.keep([])


def describe(records: list[Record]) -> str:
    """What the records would have recorded, in a few words."""
    ops = Counter(r["op"] for r in records)
    parts = []
    if ops["metrics"]:
        steps = [r["step"] for r in records if r["op"] == "metrics"]
        keys = {k for r in records if r["op"] == "metrics" for k in r["metrics"]}
        parts.append(f"{ops['metrics']} metric records ({len(keys)} keys, steps {min(steps)}-{max(steps)})")
    if ops["params"] or ops["tags"] or ops["text"]:
        parts.append("params, tags and the resolved config")
    if ops["artifacts"]:
        parts.append(
            "artifacts "
            + ", ".join(r["path"] or Path(r["local"]).name for r in records if r["op"] == "artifacts")
        )
    parts += [f"the model registration as {r['name']}" for r in records if r["op"] == "register"]
    parts += [f"the run status {r['status']}" for r in records if r["op"] == "status"]
    return "; ".join(parts)

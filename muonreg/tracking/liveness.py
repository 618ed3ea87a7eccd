"""Telling a RUNNING run whose process died from one that is still training.

A process killed with SIGKILL, or whose node was lost, cannot close its MLflow run: the run stays
RUNNING. Training processes refresh a heartbeat tag every HEARTBEAT_S (muonreg.tracking.sink), so
a RUNNING run not heard of for DEAD_AFTER_S is one whose process died; `compare` shows it as DEAD
and `resume=auto` continues it.
"""

from __future__ import annotations

import time

from mlflow.entities import Run

HEARTBEAT_TAG = "muonreg.heartbeat"  # unix time of the last sign of life
HEARTBEAT_S = 60.0
DEAD_AFTER_S = 5 * HEARTBEAT_S


def heartbeat_tag() -> dict[str, str]:
    return {HEARTBEAT_TAG: f"{time.time():.0f}"}


def process_died(run: Run, now: float | None = None) -> bool:
    """True for a RUNNING run with no heartbeat (nor start) within DEAD_AFTER_S."""
    if run.info.status != "RUNNING":
        return False
    beat = run.data.tags.get(HEARTBEAT_TAG)
    last = float(beat) if beat else run.info.start_time / 1000
    return (time.time() if now is None else now) - last > DEAD_AFTER_S

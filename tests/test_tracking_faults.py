"""The tracking store misbehaving: a fresh database shared by concurrent sweeps, a database locked
mid-run, a plain path or a dead server as the URI, runs whose process died. Real SQLite stores,
real `train.py` processes, no mocks."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from muonreg.compare import table
from muonreg.config import ConfigError
from muonreg.evaluate import main as evaluate_main
from muonreg.tracking.liveness import DEAD_AFTER_S, HEARTBEAT_TAG
from muonreg.tracking.replay import replay_file
from muonreg.tracking.sink import TrackingSink
from muonreg.tracking.store import TrackingError, connect
from muonreg.training.rundir import RunDir, find_resumable, resume_target

from train_cli import ENV, ROOT, client, command, runs, split

HOLD_LOCK = """
import fcntl, sys, time
handle = open(sys.argv[1], "w")
fcntl.lockf(handle, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def store(tmp_path, empty_mlflow_db) -> tuple[MlflowClient, str, str]:
    """(client, uri, experiment id) of a SQLite store of this test's own."""
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = connect(uri)
    return c, uri, c.create_experiment("muonreg", artifact_location=(tmp_path / "artifacts").as_uri())


def _steps(c: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def _lock(db: Path) -> sqlite3.Connection:
    """Hold SQLite's exclusive lock: every other reader and writer of `db` fails until released."""
    connection = sqlite3.connect(db, isolation_level=None, timeout=60)
    connection.execute("BEGIN EXCLUSIVE")
    return connection


@pytest.mark.slow
def test_two_sweeps_started_together_on_a_fresh_database_record_every_run(tmp_path, data_dir):
    cmd = command(tmp_path, data_dir, "assignment_threshold=0.1,0.2", multirun=True)
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    parents, children = split(runs(tmp_path))
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    for parent in parents:
        mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert sorted(c.data.params["assignment_threshold"] for c in mine) == ["0.1", "0.2"]


@pytest.mark.slow
def test_a_database_locked_mid_run_never_stops_training_and_its_records_replay(
    tmp_path, data_dir, empty_mlflow_db
):
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    out = tmp_path / "train.out"
    with open(out, "w") as sink:
        proc = subprocess.Popen(
            command(tmp_path, data_dir, "trainer.max_epochs=3", "trainer.checkpoint_every_steps=1"),
            cwd=ROOT,
            env=ENV,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    sidecars = tmp_path.glob("outputs/**/checkpoints/last.pt.json")
    while not (found := next(sidecars, None)) and proc.poll() is None:
        time.sleep(0.01)
        sidecars = tmp_path.glob("outputs/**/checkpoints/last.pt.json")
    lock = _lock(tmp_path / "mlflow.db")  # from the first checkpoint (step 1) to the end of the process
    locked_at = json.loads(found.read_text())["global_step"]
    assert proc.wait(timeout=300) == 0
    lock.rollback()
    text = out.read_text()

    trained = json.loads(found.read_text())
    assert trained["finished"] and trained["global_step"] > locked_at  # training went on meanwhile
    warnings = [line for line in text.splitlines() if "is not accepting writes" in line]
    assert len(warnings) == 1 and str(tmp_path / "mlflow.db") in warnings[0]
    buffer = found.parent.parent / "tracking-buffer.jsonl"
    assert f"replay them with: python -m muonreg.tracking.replay {buffer}" in text
    (run,) = runs(tmp_path)
    assert run.info.status == "RUNNING"

    replay = [sys.executable, "-m", "muonreg.tracking.replay", str(buffer)]
    subprocess.run(replay, cwd=ROOT, env=ENV, check=True, capture_output=True)
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and not buffer.exists()
    c = client(tmp_path)
    assert _steps(c, run.info.run_id, "val/loss") == [0, 1, 2]
    assert _steps(c, run.info.run_id, "test/loss") == [3]
    assert _steps(c, run.info.run_id, "train/step_loss") == list(range(1, trained["global_step"] + 1))
    assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {".hydra", "checkpoints", "evaluation"}


def _metrics_table(db: Path, present: bool) -> None:
    """Take MLflow's metrics table away (every metric write fails at once) or put it back."""
    names = ("metrics", "metrics_away") if present else ("metrics_away", "metrics")
    with sqlite3.connect(db) as connection:
        connection.execute(f"ALTER TABLE {names[1]} RENAME TO {names[0]}")


def test_the_sink_warns_once_while_the_store_refuses_writes_and_writes_everything_when_it_is_back(
    tmp_path, store, caplog
):
    caplog.set_level(logging.INFO, logger="muonreg.tracking.sink")
    c, uri, experiment = store
    run_id = c.create_run(experiment).info.run_id
    sink = TrackingSink(c, run_id, uri, tmp_path / "buffer.jsonl", retry_every_s=0.2)
    _metrics_table(tmp_path / "mlflow.db", present=False)
    for step in range(6):
        sink.log_metrics({"loss": 1.0 / (step + 1)}, step)
    deadline = time.time() + 30
    while "is not accepting writes" not in caplog.text and time.time() < deadline:
        time.sleep(0.05)
    assert len((tmp_path / "buffer.jsonl").read_text().splitlines()) == 7  # header + records, on disk
    _metrics_table(tmp_path / "mlflow.db", present=True)
    assert sink.close("FINISHED")
    assert caplog.text.count("is not accepting writes") == 1 and f"MLflow store {uri} is back" in caplog.text
    assert _steps(c, run_id, "loss") == list(range(6)) and c.get_run(run_id).info.status == "FINISHED"
    assert not (tmp_path / "buffer.jsonl").exists()


def test_a_store_slow_to_answer_never_holds_up_a_training_step(tmp_path, store):
    """Only rank 0 logs, and its training thread only appends to a file: a write hanging on the store
    (here on SQLite's lock) delays neither rank 0's next step nor the ranks waiting for it there."""
    c, uri, experiment = store
    run_id = c.create_run(experiment).info.run_id
    sink = TrackingSink(c, run_id, uri, tmp_path / "buffer.jsonl")
    connection = _lock(tmp_path / "mlflow.db")
    sink.log_metrics({"loss": 1.0}, 0)
    time.sleep(0.5)  # the writer thread is now waiting for the lock
    start = time.perf_counter()
    for step in range(1, 51):
        sink.log_metrics({"loss": 1.0 / step}, step)
    assert time.perf_counter() - start < 0.5
    connection.execute("ROLLBACK")
    assert sink.close("FINISHED") and _steps(c, run_id, "loss") == list(range(51))


def test_what_the_store_never_took_is_named_at_the_end_and_replays(tmp_path, store, caplog):
    c, uri, experiment = store
    run_id = c.create_run(experiment).info.run_id
    buffer = tmp_path / "buffer.jsonl"
    sink = TrackingSink(c, run_id, uri, buffer)
    _metrics_table(tmp_path / "mlflow.db", present=False)
    for step in range(4):
        sink.log_metrics({"loss": float(step)}, step)
    (tmp_path / "report").mkdir()
    (tmp_path / "report/table.md").write_text("| a |")
    sink.log_artifacts(tmp_path / "report", "evaluation")
    assert not sink.close("FINISHED")
    assert (
        f"MLflow run {run_id}: not recorded in {uri}: 4 metric records (1 keys, steps 0-3); artifacts "
        f"evaluation; the run status FINISHED. They are kept in {buffer}; once the store is back, replay "
        f"them with: python -m muonreg.tracking.replay {buffer}"
    ) in caplog.text
    _metrics_table(tmp_path / "mlflow.db", present=True)
    replay_file(buffer)
    assert _steps(c, run_id, "loss") == [0, 1, 2, 3] and c.get_run(run_id).info.status == "FINISHED"
    assert [a.path for a in c.list_artifacts(run_id, "evaluation")] == ["evaluation/table.md"]
    with pytest.raises(TrackingError, match="no such buffer file"):
        replay_file(buffer)


def test_a_replay_while_the_store_still_refuses_writes_says_so_in_one_line(tmp_path, store):
    c, uri, experiment = store
    run_id = c.create_run(experiment).info.run_id
    buffer = tmp_path / "buffer.jsonl"
    sink = TrackingSink(c, run_id, uri, buffer)
    _metrics_table(tmp_path / "mlflow.db", present=False)  # and it stays away during the replay
    sink.log_metrics({"loss": 1.0}, 0)
    assert not sink.close("FINISHED")
    replay = [sys.executable, "-m", "muonreg.tracking.replay", str(buffer)]
    result = subprocess.run(replay, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: replaying {buffer} into {uri} stopped (") and "metrics" in line
    assert line.endswith("); what is left stays in the file")
    assert buffer.is_file()


def test_a_resumed_sink_writes_what_its_killed_predecessor_left_without_duplicates(tmp_path, store):
    c, uri, experiment = store
    run_id = c.create_run(experiment).info.run_id
    first = TrackingSink(c, run_id, uri, tmp_path / "buffer.jsonl")
    for step in range(4):
        first.log_metrics({"loss": float(step)}, step)
    assert first.close("KILLED")
    left = TrackingSink(c, run_id, uri, tmp_path / "unused.jsonl")
    left.buffer.path = tmp_path / "buffer.jsonl"  # what a process killed before writing steps 2-5 left
    for step in range(2, 6):
        left.buffer.append({"op": "metrics", "metrics": {"loss": float(step)}, "step": step, "time": 0})
    left.close("KILLED")

    resumed = TrackingSink(c, run_id, uri, tmp_path / "buffer.jsonl", resumed=True)
    for step in range(3, 8):  # recomputed from a checkpoint at step 3
        resumed.log_metrics({"loss": float(step)}, step)
    assert resumed.close("FINISHED")
    assert _steps(c, run_id, "loss") == list(range(8))


def test_a_plain_path_tracking_uri_is_refused_with_the_fix():
    with pytest.raises(TrackingError, match=r"'/tmp/x' .* is a plain path.* sqlite:////tmp/x\.db"):
        connect("/tmp/x")


def test_an_unreachable_tracking_server_fails_within_seconds_naming_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    start = time.time()
    with pytest.raises(TrackingError, match=rf"server {uri} cannot be reached"):
        connect(uri)
    assert time.time() - start < 10


def test_a_server_that_accepts_connections_but_never_answers_fails_within_seconds_naming_it():
    with socket.socket() as silent:  # the kernel completes connections; nothing ever reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.time()
        with pytest.raises(TrackingError, match=rf"server {uri} does not answer"):
            connect(uri)
        assert time.time() - start < 10


def test_compare_shows_a_running_run_whose_process_died_as_dead(store):
    c, _, experiment = store
    dead = c.create_run(experiment, tags={HEARTBEAT_TAG: f"{time.time() - 2 * DEAD_AFTER_S:.0f}"})
    alive = c.create_run(experiment, tags={HEARTBEAT_TAG: f"{time.time():.0f}"})
    done = c.create_run(experiment)
    c.set_terminated(done.info.run_id, "FINISHED")
    rows = table([c.get_run(r.info.run_id) for r in (dead, alive, done)], [])
    assert rows[0]["status"] == "1 DEAD, 1 FINISHED, 1 RUNNING"


def test_evaluating_an_unfinished_run_says_so_in_one_line(store):
    c, uri, experiment = store
    run_id = c.create_run(experiment, tags={"muonreg.run_dir": "/x/run"}).info.run_id
    with pytest.raises(
        SystemExit,
        match=rf"^error: MLflow run {run_id} is RUNNING, not FINISHED; evaluate its latest checkpoint "
        r"with --checkpoint /x/run/checkpoints/last\.pt$",
    ):
        evaluate_main(["--run-id", run_id, "--tracking-uri", uri])


def test_resume_takes_neither_a_live_nor_a_finished_run(tmp_path, store):
    c, _, experiment = store
    live_id, finished_id = (c.create_run(experiment).info.run_id for _ in range(2))
    c.set_terminated(finished_id, "FINISHED")
    live = RunDir(tmp_path / "outputs/live")
    live.path.mkdir(parents=True)
    live.write(config_hash="h", mlflow_run_id=live_id, done=False)
    trainer = subprocess.Popen(  # holds the run's lock, as the process training it does, for its life
        [sys.executable, "-c", HOLD_LOCK, str(live.path / "run.lock")], stdout=subprocess.PIPE, text=True
    )
    assert trainer.stdout.readline() == "locked\n"
    finished = RunDir(tmp_path / "outputs/finished")  # killed between MLflow's FINISHED and run.json
    finished.path.mkdir(parents=True)
    finished.write(config_hash="h", mlflow_run_id=finished_id, done=False)

    assert find_resumable([tmp_path / "outputs"], "h", c) is None
    assert finished.record["done"]  # repaired from MLflow
    with pytest.raises(ConfigError, match=r"is finished, and a finished run is never resumed"):
        resume_target(finished.path / "checkpoints/last.pt", c)
    trainer.kill()  # its process dies
    trainer.wait()
    found = find_resumable([tmp_path / "outputs"], "h", c)
    assert found is not None and found.path == live.path
    found.release()

"""Sweep comparison from MLflow: a real smoke sweep, read back on SQLite and through a local `mlflow server`."""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import mlflow
import pytest

from muonreg.compare import compare, latest_sweep
from muonreg.data.simulate import write_simulated_dataset

from train_cli import ENV, command

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback (SQLite backend, proxied artifacts), stopped afterwards."""
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_seeded_sweep_compared_through_a_tracking_server(tmp_path, mlflow_server):
    env = {**ENV, "MLFLOW_TRACKING_URI": mlflow_server}
    cmd = command(tmp_path, tmp_path / "data", "assignment_threshold=0.1,0.5", "seed=0,1", multirun=True)
    subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, check=True, capture_output=True, timeout=900)
    rows, out = compare(tracking_uri=mlflow_server, out=tmp_path / "report")
    assert sorted(r["assignment_threshold"] for r in rows) == ["0.1", "0.5"]  # ranked by validation
    assert all(r["runs"] == 2 and r["status"] == "2 FINISHED" for r in rows)
    assert all(not math.isnan(r["test/track_efficiency std"]) for r in rows)  # spread over the two seeds
    assert (out / "compare_assignment_threshold.png").stat().st_size > 0
    text = (out / "compare.md").read_text()
    assert "| 0.1 | 2 | 2 FINISHED |" in text and "### held-out detector" in text and "(n=" in text
    client = mlflow.MlflowClient(mlflow_server)
    parent = latest_sweep(client)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert "comparison/compare.md" in logged


def test_failed_runs_are_shown_as_failed(tmp_path):
    good = write_simulated_dataset(tmp_path / "good", 200, seed=1, progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    with h5py.File(bad / "data/events_0000.h5", "r+") as f:
        hits = f["hits"][0]
        hits[0, 19] = 5
        f["hits"][0] = hits
    cmd = command(tmp_path, tmp_path / "data", f"data.path={good},{bad}", multirun=True)
    subprocess.run(cmd, cwd=Path(__file__).parents[1], env=ENV, capture_output=True, timeout=900)
    rows, _ = compare(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", out=tmp_path / "report")
    status = {r["data.path"]: r["status"] for r in rows}
    assert status == {str(good): "1 FINISHED", str(bad): "1 FAILED"}
    failed = next(r for r in rows if r["data.path"] == str(bad))
    assert math.isnan(failed["test/pt_resolution"])  # no numbers from a failed run, but the row is there


def test_two_sweeps_of_one_study_pool_into_one_table(tmp_path):
    """A study extended by a second sweep (another value, more seeds) compares as one."""
    parents = []
    for values in ("assignment_threshold=0.1 seed=0,1", "assignment_threshold=0.5 seed=0"):
        cmd = command(tmp_path, tmp_path / "data", *values.split(), multirun=True)
        subprocess.run(
            cmd, cwd=Path(__file__).parents[1], env=ENV, check=True, capture_output=True, timeout=900
        )
        parents.append(latest_sweep(mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")).info.run_id)
    assert parents[0] != parents[1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rows, out = compare(tracking_uri=uri, parent=parents, out=tmp_path / "report")
    assert sorted((r["assignment_threshold"], r["runs"], r["status"]) for r in rows) == [
        ("0.1", 2, "2 FINISHED"),
        ("0.5", 1, "1 FINISHED"),
    ]
    title = (out / "compare.md").read_text().splitlines()[0]
    assert title == f"## 2 sweeps pooled: {parents[0][:8]}, {parents[1][:8]}"
    logged = {p: {a.path for a in mlflow.MlflowClient(uri).list_artifacts(p, "comparison")} for p in parents}
    assert "comparison/compare.md" in logged[parents[0]] and not logged[parents[1]]  # the first sweep's

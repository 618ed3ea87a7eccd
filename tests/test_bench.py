"""The benchmarks run and print their figures in the documented `name: value` lines (tiny sizes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).parents[1] / "bench"


def figures(tmp_path: Path, script: str, *args: str) -> dict[str, float]:
    env = {**os.environ, "MUONREG_BENCH_OUT": str(tmp_path)}
    cmd = [sys.executable, str(BENCH / script), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    assert out.startswith("# command: python ")  # every result says how it was made
    lines = [line.split(": ", 1) for line in out.splitlines() if not line.startswith(("#", "|"))]
    return {name: float(value) for name, value in lines if value.replace(".", "", 1).isdigit()}


def test_loader_benchmark_prints_events_per_second(tmp_path):
    found = figures(tmp_path, "loader_throughput.py", "--events", "300", "--batch", "50", "--uncompressed")
    assert found["loader_events_per_s"] > 0


def test_training_benchmark_prints_throughput_and_memory(tmp_path):
    args = ["--events", "300", "--batch", "50", "--steps", "2", "--warmup", "1", "--workers", "0"]
    found = figures(tmp_path, "train_throughput.py", *args)
    assert found["train_events_per_s"] > 0 and 0 <= found["data_wait_fraction"] <= 1
    assert 100 < found["peak_rss_mib"] < 4000

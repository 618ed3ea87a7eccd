"""The benchmarks run and print their figures in the documented `name: value` lines (tiny sizes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
BENCH = Path(__file__).parents[1] / "bench"


# Runs a script as a machine without these packages would (the GPU host has no mlflow, no matplotlib).
WITHOUT = """import os, runpy, sys
sys.modules.update(dict.fromkeys(sys.argv[1].split(",")))
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def output(tmp_path: Path, script: str, *args: str, without: tuple[str, ...] = ()) -> dict[str, str]:
    env = {**os.environ, "MUONREG_BENCH_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    python = [sys.executable, "-c", WITHOUT, ",".join(without)] if without else [sys.executable]
    cmd = [*python, str(BENCH / script), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    assert out.startswith("# command: python ")  # every result says how it was made
    return dict(line.split(": ", 1) for line in out.splitlines() if not line.startswith(("#", "|")))


def figures(tmp_path: Path, script: str, *args: str) -> dict[str, float]:
    found = output(tmp_path, script, *args).items()
    return {name: float(value) for name, value in found if value.replace(".", "", 1).isdigit()}


def test_loader_benchmark_prints_events_per_second(tmp_path):
    found = figures(tmp_path, "loader_throughput.py", "--events", "300", "--batch", "50", "--uncompressed")
    assert found["loader_events_per_s"] > 0


def test_training_benchmark_prints_throughput_and_memory(tmp_path):
    args = ["--events", "300", "--batch", "50", "--steps", "2", "--warmup", "1", "--workers", "0"]
    found = figures(tmp_path, "train_throughput.py", *args, "--multiplicity", "default", "--profile")
    assert found["train_events_per_s"] > 0 and 0 <= found["data_wait_fraction"] <= 1
    assert 100 < found["peak_rss_mib"] < 4000
    assert found["step_forward_ms"] > 0 and found["step_backward_ms"] > 0


def test_gpu_check_runs_without_mlflow_and_names_what_needs_cuda(tmp_path):
    """On a dataset of one's own (nothing simulated, the output folder not there yet); 7 steps of batch 50
    outlast one epoch of its 276 training events: the check goes on into the next."""
    from muonreg.data.simulate import write_simulated_dataset

    data = write_simulated_dataset(tmp_path / "data", 300, seed=0, progress=False)
    args = [
        "--batch",
        "50",
        "--steps",
        "6",
        "--warmup",
        "1",
        "--workers",
        "0",
        "--override",
        f"data.path={data}",
    ]
    found = output(tmp_path / "out", "gpu_check.py", *args, without=("mlflow", "matplotlib", "sqlalchemy"))
    assert float(found["train_events_per_s"]) > 0 and float(found["eval_events_per_s"]) > 0
    assert found["sdpa_default[reference]"].startswith(("flash", "efficient", "cudnn", "math"))
    assert found["sdpa_math[reference]"] == "ok"
    assert 0 <= float(found["bf16_pt_rel_diff_median"]) < 0.1  # CPU bf16 autocast against float32
    if not torch.cuda.is_available():
        assert found["train_peak_mib"] == found["host_syncs_per_step"] == "SKIPPED (no CUDA device)"
    assert found["smoke_run"] == "SKIPPED (train.py needs mlflow, matplotlib)"


def test_chaos_sweep_finishes_every_job_once_whatever_the_kills(tmp_path):
    """Two sweeps of 2 jobs on one fresh database, 3 jobs killed (SIGKILL, SIGTERM or SIGINT), rerun with
    resume=auto until clean: every job's run FINISHED once, no metric point twice, both parents FINISHED."""
    args = ["chaos", "--jobs", "4", "--kills", "3", "--spacing", "2", "--parallel", "1"]
    found = output(tmp_path, "reliability.py", *args)
    assert found["kills"].startswith("3 (") and found["job_runs"] == "4"
    assert found["runs_finished"] == "4/4" and found["jobs_finished_exactly_once"] == "4/4"
    assert found["duplicate_metric_points"] == "0" and found["parents_finished"] == "2/2"

"""What a CPU run's reproducibility depends on: the number of torch intra-op threads.

    python bench/thread_reproducibility.py [--threads 1 2] [--repeats 2] [--epochs 2]

Trains the same `debug=smoke` configuration (seed 0, the smoke dataset, no references) --repeats times
at each thread count (OMP_NUM_THREADS, which sets torch's intra-op threads) and prints the final
losses and validation metrics read back from MLflow. Runs at one thread count agree to the last bit;
another thread count splits matrix products and reductions differently, so float sums round
differently and the trained network, hence every metric, moves. Runs go to bench/out/threads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from common import OUT, header
from mlflow.tracking import MlflowClient

from muonreg.config import project_root

SHOWN = ("train/loss", "val/loss", "val/track_efficiency", "val/hit_purity", "test/loss")


def train(root, threads: int, epochs: int) -> dict[str, float]:
    """One smoke training at `threads` intra-op threads; its final metrics."""
    shutil.rmtree(root, ignore_errors=True)
    command = [
        sys.executable,
        "train.py",
        "debug=smoke",
        f"trainer.max_epochs={epochs}",
        f"paths.root={root}",
        f"paths.data={OUT / 'threads' / 'data'}",
        "evaluation.fit_reference=false",
        "evaluation.assigned_fit_events=0",
        "evaluation.displays=0",
        "evaluation.heldout.events=0",
        "tracking.log_model=false",
        "tracking.log_checkpoint=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, cwd=project_root(), env=env, check=True, capture_output=True)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("muonreg").experiment_id])
    assert run.data.tags["torch_threads"] == str(threads)
    return run.data.metrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    header(sys.argv)
    print("| threads | run | " + " | ".join(SHOWN) + " |")
    print("|---|---|" + "---|" * len(SHOWN))
    for threads in args.threads:
        for repeat in range(args.repeats):
            metrics = train(OUT / "threads" / f"t{threads}-r{repeat}", threads, args.epochs)
            print(
                f"| {threads} | {repeat} | " + " | ".join(f"{metrics[k]!r}" for k in SHOWN) + " |", flush=True
            )


if __name__ == "__main__":
    main()

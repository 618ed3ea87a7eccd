"""Reliability figures: concurrent jobs on one fresh SQLite database; training time a kill -9 costs.

    python bench/reliability.py concurrent [--jobs 8] [--code DIR]
    python bench/reliability.py kill [--trials 4] [--events 200000] [--seed 0]

`concurrent` starts --jobs `python train.py -m debug=smoke seed=K` processes at once on a fresh
SQLite database (each a one-job sweep: a parent and a child run) and counts the runs recorded
FINISHED. `--code DIR` runs another checkout's train.py (e.g. an older commit, from `git archive`).

`kill` trains the default configuration (CPU trainer: batch 100, 2 workers, checkpoints at epoch
ends and every trainer.checkpoint_every_minutes) on a simulated set of --events (enough for epochs
longer than the kill window, as real data sets of millions of events give), kills it with SIGKILL
after a uniformly random 30-270 s of training, resumes it with `resume=auto` and measures what the
kill cost: the training done since the last checkpoint (redone after the resume), plus the time
the resumed process needs to start training again. It also says what checkpoints at epoch ends
only (the old default) would have cost at the same moment. Logs go to bench/out/kill.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from common import OUT, header
from mlflow.tracking import MlflowClient

from muonreg.config import project_root
from muonreg.errors import root_cause

PROGRESS = "[muonreg.training.loop][INFO] - epoch "


def _env(code: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "MUONREG_ROOT": str(code), "OMP_NUM_THREADS": "1"}  # 1 thread: a 2-core machine


def concurrent(jobs: int, code: Path) -> None:
    root = OUT / "concurrent"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    base = [
        sys.executable,
        "train.py",
        "-m",
        "debug=smoke",
        f"paths.root={root}",
        f"paths.data={OUT / 'data'}",
    ]
    start = time.time()
    procs = [
        subprocess.Popen(
            [*base, f"seed={k}"],
            cwd=code,
            env=_env(code),
            stdout=open(root / f"job{k}.log", "w"),  # noqa: SIM115 (closed with the process)
            stderr=subprocess.STDOUT,
        )
        for k in range(jobs)
    ]
    exited_ok = sum(p.wait() == 0 for p in procs)
    elapsed = time.time() - start
    print(f"processes_exited_ok: {exited_ok}/{jobs}")
    try:
        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    except Exception as err:  # a schema creation raced half-way leaves the database unusable
        print(f"database_unusable: {root_cause(err)}")
        runs = []
    parents = [r for r in runs if r.data.tags.get("muonreg.role") == "sweep"]
    children = [r for r in runs if r not in parents]
    finished = [sum(r.info.status == "FINISHED" for r in group) for group in (children, parents)]
    print(f"job_runs_finished: {finished[0]}/{jobs}")
    print(f"parent_runs_finished: {finished[1]}/{jobs}")
    print(f"wall_s: {elapsed:.0f}")


def _stamp(line: str) -> float:
    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _lines(log: Path, marker: str, after: float = 0.0) -> list[float]:
    """Times of the log lines holding `marker`, logged after `after`."""
    if not log.is_file():
        return []
    return [t for line in log.read_text().splitlines() if marker in line and (t := _stamp(line)) > after]


def _wait_for(find, timeout: float = 900.0):
    deadline = time.time() + timeout
    while not (found := find()):
        if time.time() > deadline:
            raise TimeoutError("the run never got there; see its train.log under bench/out/kill")
        time.sleep(0.2)
    return found


def _trial(trial: int, kill_after: float, events: int) -> dict[str, float]:
    root, code = OUT / "kill", project_root()
    base = [sys.executable, "train.py", f"paths.root={root}", f"paths.data={OUT / 'data'}"]
    base += [f"data.simulation.events={events}", "trainer.log_every_steps=1", f"seed={trial}"]
    proc = subprocess.Popen(
        base, cwd=code, env=_env(code), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    launched = time.time()
    log = _wait_for(
        lambda: next((p for p in root.glob("outputs/*/*/train.log") if _lines(p, PROGRESS, launched)), None)
    )
    trained_from = _lines(log, PROGRESS, launched)[0]
    time.sleep(max(0.0, trained_from + kill_after - time.time()))
    proc.send_signal(signal.SIGKILL)
    killed = time.time()
    proc.wait()
    sidecar = log.parent / "checkpoints" / "last.pt.json"
    checkpointed = sidecar.stat().st_mtime if sidecar.is_file() else trained_from
    epoch_ends = [t for t in _lines(log, ": val/loss=") if t < killed]
    step = json.loads(sidecar.read_text())["global_step"] if sidecar.is_file() else 0

    resume = subprocess.Popen(
        [*base, "resume=auto"], cwd=code, env=_env(code), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    relaunched = time.time()
    back = _wait_for(lambda: _lines(log, PROGRESS, relaunched))[0]
    resume.send_signal(signal.SIGTERM)  # measured: stop here (the run ends KILLED, resumable)
    resume.wait()
    return {
        "killed_after_s": killed - trained_from,
        "checkpoint_step": step,
        "redo_s": killed - max(checkpointed, trained_from),
        "restart_s": back - relaunched,
        "epoch_end_only_redo_s": killed - max([trained_from, *epoch_ends]),
    }


def kill(trials: int, events: int, seed: int) -> None:
    shutil.rmtree(OUT / "kill", ignore_errors=True)
    rng = random.Random(seed)
    rows = [_trial(t, rng.uniform(30, 270), events) for t in range(trials)]
    print(
        "| trial | killed after (s of training) | last checkpoint (step) | redone (s) | restart (s) "
        "| lost in all (s) | with epoch-end checkpoints only (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for t, r in enumerate(rows):
        print(
            f"| {t} | {r['killed_after_s']:.0f} | {r['checkpoint_step']} | {r['redo_s']:.0f} | {r['restart_s']:.0f} "
            f"| {r['redo_s'] + r['restart_s']:.0f} | {r['epoch_end_only_redo_s'] + r['restart_s']:.0f} |"
        )
    lost = [r["redo_s"] + r["restart_s"] for r in rows]
    old = [r["epoch_end_only_redo_s"] + r["restart_s"] for r in rows]
    print(f"lost_s_mean: {sum(lost) / len(lost):.0f}")
    print(f"lost_s_max: {max(lost):.0f}")
    print(f"epoch_end_only_lost_s_mean: {sum(old) / len(old):.0f}")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    conc = sub.add_parser("concurrent", help="concurrent jobs on one fresh SQLite database")
    conc.add_argument("--jobs", type=int, default=8)
    conc.add_argument("--code", type=Path, default=project_root(), help="checkout whose train.py to run")
    kil = sub.add_parser("kill", help="training time lost to a kill -9 at a random moment")
    kil.add_argument("--trials", type=int, default=4)
    kil.add_argument("--events", type=int, default=200_000, help="simulated events (80 %% train)")
    kil.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    args = parser.parse_args()
    header(sys.argv)
    if args.what == "concurrent":
        concurrent(args.jobs, args.code.resolve())
    else:
        kill(args.trials, args.events, args.seed)


if __name__ == "__main__":
    main()

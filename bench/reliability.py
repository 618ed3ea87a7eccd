"""Reliability figures: concurrent jobs on one fresh SQLite database; training time a kill -9 costs.

    python bench/reliability.py concurrent [--jobs 8] [--code DIR]
    python bench/reliability.py kill [--trials 4] [--events 200000] [--seed 0]
    python bench/reliability.py chaos [--jobs 16] [--kills 8] [--spacing 20] [--parallel 2] [--seed 0]

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

`chaos` runs --jobs smoke-sized jobs as two sweeps at once (joblib, --parallel jobs each at a time) on one
fresh SQLite database, and kills --kills of them, one after another, each a uniformly random
0..--spacing seconds after the previous one (the first: after the first job started), with SIGKILL,
SIGTERM or SIGINT drawn at random: a job process holding its run's lock (read from /proc/locks) is
picked at random. When the sweeps have ended, the same two commands run again with
`resume=auto`, as often as it takes for both to exit cleanly. It reports the job runs FINISHED (each
job exactly once), metric points recorded twice, parent runs FINISHED, the training each kill cost
(trained after the checkpoint the job resumed from, up to the kill) and the wall time. Logs go to
bench/out/chaos.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
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


CHAOS_SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
# debug=smoke with two epochs (a checkpoint between them) and a test evaluation without the extras
CHAOS_JOB = [
    "debug=smoke",
    "trainer.max_epochs=2",
    "evaluation.fit_reference=false",
    "evaluation.assigned_fit_events=0",
    "evaluation.displays=0",
    "tracking.log_model=false",
    "tracking.experiment=chaos",
]
MAX_ROUNDS = 10


def _chaos_sweeps(root: Path, jobs: int, parallel: int) -> list[list[str]]:
    """Two sweeps of jobs // 2 seeds each, `parallel` jobs at a time, in fixed sweep dirs (a rerun
    continues them)."""
    half = jobs // 2
    return [
        [
            sys.executable,
            "train.py",
            "-m",
            *CHAOS_JOB,
            "hydra/launcher=joblib",
            f"hydra.launcher.n_jobs={parallel}",
            f"seed={','.join(str(k) for k in range(s * half, (s + 1) * half))}",
            f"hydra.sweep.dir={root / f'sweep{s}'}",
            f"paths.root={root}",
            f"paths.data={OUT / 'data'}",
        ]
        for s in range(2)
    ]


def _holders(root: Path) -> dict[Path, int]:
    """The job directories under `root` whose run lock a process holds, and that process (/proc/locks)."""
    locks = {p.stat().st_ino: p.parent for p in root.glob("sweep*/*/run.lock")}
    held = {}
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "POSIX" and (inode := int(fields[5].split(":")[2])) in locks:
            held[locks[inode]] = int(fields[4])
    return held


def _released(job: Path, timeout: float = 120.0) -> None:
    """Wait until no process holds the job's run lock (a stopped job has closed its run)."""
    deadline = time.time() + timeout
    while job in _holders(job.parent.parent) and time.time() < deadline:
        time.sleep(0.1)


def _training_lost(job: Path, since: float, killed: float) -> tuple[int, float]:
    """(steps this attempt, held since `since`, logged before the kill; seconds of them trained after
    the checkpoint it resumes from)."""
    sidecar = job / "checkpoints" / "last.pt.json"
    checkpoint = sidecar.stat().st_mtime if sidecar.is_file() else 0.0
    trained = [t for t in _lines(job / "train.log", PROGRESS, since) if t <= killed]
    if not trained or trained[-1] <= checkpoint:
        return len(trained), 0.0
    return len(trained), trained[-1] - max(checkpoint, trained[0])


def _chaos_records(root: Path) -> tuple[list, list]:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("muonreg.role") == "sweep"]
    children = [r for r in runs if r not in parents]
    duplicates = 0
    for run in children:
        for key in run.data.metrics:
            steps = Counter(m.step for m in client.get_metric_history(run.info.run_id, key))
            duplicates += sum(n - 1 for n in steps.values())
    return parents, children, duplicates


def chaos(jobs: int, kills: int, spacing: float, parallel: int, seed: int) -> None:
    root, code = OUT / "chaos", project_root()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    # Started in the background by a shell, this process ignores SIGINT and its jobs would inherit that
    # (a job keeps an ignored SIGINT ignored): the SIGINT kills must reach them as Ctrl-C would.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rng = random.Random(seed)
    sweeps = _chaos_sweeps(root, jobs, parallel)
    start = time.time()
    seen: dict[tuple[Path, int], float] = {}  # (job dir, process) -> when first seen holding its lock
    done: list[dict] = []
    next_kill = math.inf  # set once the first job has started
    for rounds in range(1, MAX_ROUNDS + 1):
        again = ["resume=auto"] if rounds > 1 else []
        with open(root / "sweeps.log", "a") as log:
            procs = [
                subprocess.Popen(
                    [*cmd, *again], cwd=code, env=_env(code), stdout=log, stderr=subprocess.STDOUT
                )
                for cmd in sweeps
            ]
            while any(p.poll() is None for p in procs):
                holders = _holders(root)
                for held in holders.items():
                    seen.setdefault(held, time.time())
                if holders and next_kill == math.inf and not done:
                    next_kill = time.time() + rng.uniform(0, spacing)
                if len(done) < kills and time.time() >= next_kill and holders:
                    job, pid = rng.choice(sorted(holders.items()))
                    signum = rng.choice(CHAOS_SIGNALS)
                    killed = time.time()
                    os.kill(pid, signum)
                    _released(job)
                    steps, lost = _training_lost(job, seen[(job, pid)], killed)
                    done.append(
                        {
                            "job": str(job.relative_to(root)),
                            "signal": signal.Signals(signum).name,
                            "at_s": killed - start,
                            "steps": steps,
                            "lost_s": lost,
                        }
                    )
                    next_kill = time.time() + rng.uniform(0, spacing)
                time.sleep(0.1)
        if len(done) == kills and all(p.returncode == 0 for p in procs):
            break
    wall = time.time() - start
    parents, children, duplicates = _chaos_records(root)
    finished = Counter(
        (r.data.tags.get("mlflow.parentRunId"), r.data.tags.get("hydra.job.num"))
        for r in children
        if r.info.status == "FINISHED"
    )
    print("| kill | job | signal | at (s) | steps logged by then in this attempt | training lost (s) |")
    print("|---|---|---|---|---|---|")
    for k, d in enumerate(done):
        print(f"| {k} | {d['job']} | {d['signal']} | {d['at_s']:.0f} | {d['steps']} | {d['lost_s']:.1f} |")
    lost = [d["lost_s"] for d in done] or [0.0]
    print(
        f"kills: {len(done)} ({', '.join(f'{n} {s}' for s, n in Counter(d['signal'] for d in done).items())})"
    )
    print(f"rounds: {rounds} (the first, then {rounds - 1} with resume=auto)")
    print(f"job_runs: {len(children)}")
    print(f"runs_finished: {sum(finished.values())}/{jobs}")
    print(f"jobs_finished_exactly_once: {sum(n == 1 for n in finished.values())}/{jobs}")
    print(f"duplicate_metric_points: {duplicates}")
    print(f"parents_finished: {sum(r.info.status == 'FINISHED' for r in parents)}/{len(parents)}")
    print(f"lost_s_mean: {sum(lost) / len(lost):.1f}")
    print(f"lost_s_max: {max(lost):.1f}")
    print(f"wall_s: {wall:.0f}")


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
    cha = sub.add_parser("chaos", help="two sweeps on one fresh database, jobs killed at random, rerun")
    cha.add_argument("--jobs", type=int, default=16, help="jobs in all, half in each sweep")
    cha.add_argument("--kills", type=int, default=8)
    cha.add_argument("--spacing", type=float, default=20.0, help="at most this many seconds between kills")
    cha.add_argument("--parallel", type=int, default=2, help="jobs at a time in each sweep")
    cha.add_argument("--seed", type=int, default=0, help="seed of the kill moments, targets and signals")
    args = parser.parse_args()
    header(sys.argv)
    if args.what == "concurrent":
        concurrent(args.jobs, args.code.resolve())
    elif args.what == "kill":
        kill(args.trials, args.events, args.seed)
    else:
        chaos(args.jobs, args.kills, args.spacing, args.parallel, args.seed)


if __name__ == "__main__":
    main()

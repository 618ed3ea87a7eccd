"""Stop signals from schedulers and terminals, turned into a checkpoint and a run that can be continued.

SIGTERM (scancel, a node drain, the time limit, pre-emption), SIGUSR1/SIGUSR2 (SLURM's advance
warning, `#SBATCH --signal=USR2@120`; submitit's requeue signal) and SIGINT (Ctrl-C) all mean: stop
soon. While a training epoch runs, a signal only asks the loop to stop: it ends the step, writes
`last.pt` and raises `Stopped`, so the MLflow run ends KILLED with nothing lost. Anywhere else (data
preparation, validation, the test evaluation) it raises `Stopped` at once: the last checkpoint
already holds everything there is to keep. A second signal while a stop is pending stops at once.
`Stopped` leaves `train.py` as one line and the exit status of the signal (128 + its number).

The handler a launcher had installed is not lost: once the run is closed, the one for the signal
received is called. Under submitit (hydra/launcher=slurm) that checkpoints the job and requeues
it; the requeued job starts again in its own directory and continues the run (muonreg.training.run).
DataLoader workers ignore SIGINT, SIGUSR1 and SIGUSR2 (`ignore_stop_signals`): Ctrl-C reaches the
whole process group and SLURM's `--signal` every process of a job step, and the main process ends its
workers itself. SIGTERM stays torch's: it is how a process ends its workers at exit.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from muonreg.errors import full_traceback

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
RESUME_HINT = "continue it with resume=auto"

Handler = Callable[[int, object], object] | int | None


class Stopped(KeyboardInterrupt):
    """A stop signal ended the run; the message says where training stands."""

    def __init__(self, signum: int, message: str):
        super().__init__(signum, message)  # as the arguments: a joblib job's exception is pickled
        self.signum, self.message = signum, message

    def __str__(self) -> str:
        return self.message


def stopped_by(signum: int | None, where: str) -> Stopped:
    """`signum` None: the signal reached another process of the job (its exit status: SIGTERM's)."""
    name = signal.Signals(signum).name if signum else "a signal to another process of the job"
    return Stopped(signum or signal.SIGTERM, f"stopped by {name}: {where}; {RESUME_HINT}")


class Interrupts:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferring = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        again = self.signum is not None
        self.signum = signum
        if not self._deferring or again:
            raise stopped_by(signum, "outside a training step, the last checkpoint holds the run")

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A stretch in which a signal only sets `requested`: the caller stops at a point of its choosing."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    @contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """Handle the stop signals inside the block; on the way out of an interrupted block, hand the
        signal to the handler that was there before (submitit's requeue)."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        # a signal ignored by whoever started us (SIGINT of a shell's background job) stays ignored
        previous = {
            s: signal.signal(s, self._handle) for s in SIGNALS if signal.getsignal(s) != signal.SIG_IGN
        }
        try:
            yield self
        except KeyboardInterrupt:
            self._restore(previous)
            handler = previous.get(self.signum) if self.signum is not None else None
            if callable(handler) and handler is not signal.default_int_handler:  # that one raises
                handler(self.signum, None)  # submitit: requeue and exit; otherwise we go on stopping
            raise
        finally:
            self._restore(previous)

    @staticmethod
    def _restore(previous: dict[int, Handler]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn`: stop signals are the main process's to handle (but SIGTERM,
    with which multiprocessing ends its workers)."""
    for signum in SIGNALS:
        if signum != signal.SIGTERM:
            signal.signal(signum, signal.SIG_IGN)


@contextmanager
def exit_on_stop() -> Iterator[None]:
    """Around a command: `Stopped` leaves as its one line (its traceback with HYDRA_FULL_ERROR=1) and
    the exit status of the signal, as a shell reports a process the signal ended."""
    try:
        yield
    except Stopped as err:
        if full_traceback():
            traceback.print_exc()
        print(err, file=sys.stderr)
        raise SystemExit(128 + err.signum) from None

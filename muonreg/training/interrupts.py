"""Stop signals from schedulers, turned into a checkpoint and a run that can be continued.

SIGTERM (scancel, a node drain, the time limit, pre-emption) and SIGUSR1/SIGUSR2 (SLURM's advance
warning, `#SBATCH --signal=USR2@120`; submitit's requeue signal) all mean: stop soon. While a training
epoch runs, a signal only asks the loop to stop: it ends the step, writes `last.pt` and raises
KeyboardInterrupt, so the MLflow run ends KILLED with nothing lost. Anywhere else (data preparation,
validation, the test evaluation) it raises KeyboardInterrupt at once, as Ctrl-C does: the last
checkpoint already holds everything there is to keep.

The handler a launcher had installed is not lost: once the run is closed, the one for the signal
received is called. Under submitit (hydra/launcher=slurm) that checkpoints the job and requeues
it; the requeued job starts again in its own directory and continues the run (muonreg.training.run).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

Handler = Callable[[int, object], object] | int | None


class Interrupts:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferring = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        if not self._deferring:
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

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
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        except KeyboardInterrupt:
            self._restore(previous)
            handler = previous.get(self.signum) if self.signum is not None else None
            if callable(handler):
                handler(self.signum, None)  # submitit: requeue and exit; otherwise we go on stopping
            raise
        finally:
            self._restore(previous)

    @staticmethod
    def _restore(previous: dict[int, Handler]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

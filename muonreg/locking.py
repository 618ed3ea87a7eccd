"""Cross-process exclusion for work done once and shared: cached datasets, cached references.

Sweep jobs (joblib, SLURM arrays) start together and all want the same cached file; a file lock
makes one compute it while the others wait, and writes go to a unique temporary name followed by
an atomic rename, so no reader ever sees half a file and no two writers collide.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive(lock_path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if missing) for the duration of the block."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def temporary_name(path: str | os.PathLike) -> Path:
    """A sibling of `path` no other process uses, to write into before renaming onto `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")

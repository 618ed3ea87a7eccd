"""The least-squares fit of the test muons, computed once per dataset, event set and fit version.

Every job of a sweep evaluates on the same test events; the fit (~15 ms per muon) is stored under
`<cache_dir>/fits/`, keyed on the dataset (path and metadata), the events and the fit's version
(`muonreg.versions`), and reused. Jobs finishing together wait on a lock for the one that
computes it rather than each recomputing it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from muonreg.data.format import METADATA, DatasetReader
from muonreg.evaluation.metrics import fit_rows
from muonreg.locking import exclusive, temporary_name
from muonreg.reco.fit import fit_events
from muonreg.versions import FIT_VERSION


def reference_path(reader: DatasetReader, indices: np.ndarray, cache_dir: str | Path) -> Path:
    """Where the fit of these events of this dataset is cached."""
    key = hashlib.sha256(
        f"fit-v{FIT_VERSION}:{reader.path.resolve()}".encode()
        + (reader.path / METADATA).read_bytes()
        + np.asarray(indices, dtype=np.int64).tobytes()
    ).hexdigest()[:16]
    return Path(cache_dir) / "fits" / f"{key}.npz"


def fit_reference(reader: DatasetReader, indices: np.ndarray, cache_dir: str | Path) -> dict[str, np.ndarray]:
    """Rows (TrackRecords layout) of the least-squares fit of the truth hits of these events."""
    path = reference_path(reader, indices, cache_dir)
    with exclusive(path.with_suffix(".lock")):
        if not path.is_file():
            fit = fit_events(reader, np.asarray(indices, dtype=np.int64))
            tmp = temporary_name(path).with_suffix(".npz")
            np.savez(tmp, **fit)
            tmp.replace(path)
    with np.load(path) as cached:
        return fit_rows(dict(cached))

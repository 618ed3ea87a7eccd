"""The least-squares fit of the test muons, computed once per dataset and event set and cached.

Every job of a sweep evaluates on the same test events; the fit (a few ms per muon) is stored
under `<cache_dir>/fits/` keyed on the dataset and the events, and reused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from muonreg.data.fit import fit_events
from muonreg.data.format import METADATA, DatasetReader
from muonreg.evaluation.metrics import fit_rows


def fit_reference(reader: DatasetReader, indices: np.ndarray, cache_dir: str | Path) -> dict[str, np.ndarray]:
    """Rows (TrackRecords layout) of the least-squares fit of the truth hits of these events."""
    indices = np.asarray(indices, dtype=np.int64)
    key = hashlib.sha256(
        str(reader.path.resolve()).encode() + (reader.path / METADATA).read_bytes() + indices.tobytes()
    ).hexdigest()[:16]
    path = Path(cache_dir) / "fits" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return fit_rows(dict(cached))
    fit = fit_events(reader, indices)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **fit)
    tmp.replace(path)
    return fit_rows(fit)

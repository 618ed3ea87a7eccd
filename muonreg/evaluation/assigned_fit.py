"""The least-squares fit of the hits the network assigned to each track (plain and outlier-rejecting).

Beside the fit of the truth hits, this separates what the assignment costs from what the
regression costs: the same classical fit run on the network's own, impure hit lists. Only the
first `max_events` events are fitted (the fit takes ~15 ms per track); rows keep the network's
reconstruction flag, so the tables compare the same muons.
"""

from __future__ import annotations

import numpy as np

from muonreg.data.format import DatasetReader
from muonreg.evaluation.metrics import FIELDS, TrackRecords
from muonreg.reco.fit import fit_tracks


def assigned_fit_rows(
    records: TrackRecords, reader: DatasetReader, robust: bool, max_events: int
) -> dict[str, np.ndarray]:
    """Rows (TrackRecords layout) of fits of each reconstructed muon's assigned hits."""
    rows = records.arrays()
    events = np.unique(rows["event"])[:max_events]
    keep = np.nonzero(np.isin(rows["event"], events))[0]
    cache: dict[int, np.ndarray] = {}
    tracks = []
    for i in keep:
        event = int(rows["event"][i])
        if event not in cache:
            cache[event] = reader.read(event).hits
        tracks.append(cache[event][records.hits[i]])
    fitted = fit_tracks(tracks, reader.hit_index, robust=robust) if tracks else {"ok": np.zeros(0, bool)}
    out = {k: v[keep] for k, v in rows.items()}
    out["reco"] = out["reco"].astype(bool) & fitted["ok"]
    for f in FIELDS:
        out[f"pred_{f}"] = fitted.get(f, np.zeros(0))
    return out

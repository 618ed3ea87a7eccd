"""The least-squares fit of the hits the network assigned to each track (plain and outlier-rejecting).

Beside the fit of the truth hits, this separates what the assignment costs from what the
regression costs: the same classical fit run on the network's own, impure hit lists. Only the
first `max_events` events are fitted (the fit takes ~15 ms per track); rows keep the network's
reconstruction flag, so the tables compare the same muons.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from muonreg.data.format import DatasetReader
from muonreg.evaluation.metrics import FIELDS, TrackRecords
from muonreg.reco.fit import fit_tracks

FIT_OUTPUTS = ("pt", "p_ms", "eta", "phi", "q", "chi2_ndf", "hits_used", "ok")  # what fit_tracks returns


def fit_assigned(
    hits: Sequence[np.ndarray], assigned: Sequence[np.ndarray], index: dict[str, int], robust: bool
) -> dict[str, np.ndarray]:
    """The fit (`reco.fit.fit_tracks` outputs) of each track's assigned hits `hits[i][assigned[i]]`
    (on-disk columns, a bool mask over the event's hits); empty arrays for no tracks."""
    if not hits:
        return {k: np.zeros(0, bool if k == "ok" else np.float64) for k in FIT_OUTPUTS}
    return fit_tracks([h[a] for h, a in zip(hits, assigned, strict=True)], index, robust=robust)


def assigned_fit_rows(
    records: TrackRecords, reader: DatasetReader, robust: bool, max_events: int
) -> dict[str, np.ndarray]:
    """Rows (TrackRecords layout) of fits of each reconstructed muon's assigned hits."""
    rows = records.arrays()
    events = np.unique(rows["event"])[:max_events]
    keep = np.nonzero(np.isin(rows["event"], events))[0]
    cache: dict[int, np.ndarray] = {}
    for i in keep:
        event = int(rows["event"][i])
        if event not in cache:
            cache[event] = reader.read(event).hits
    fitted = fit_assigned(
        [cache[int(rows["event"][i])] for i in keep],
        [records.hits[i] for i in keep],
        reader.hit_index,
        robust,
    )
    out = {k: v[keep] for k, v in rows.items()}
    out["reco"] = out["reco"].astype(bool) & fitted["ok"]
    for f in FIELDS:
        out[f"pred_{f}"] = fitted[f]
    return out

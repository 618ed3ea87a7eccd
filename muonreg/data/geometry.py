"""Per-hit geometry for the track fit inside the network, from the stored columns.

The network's input features are scaled and standardised for learning; a track fit needs the
measurements themselves, in float32 metres, and what each hit measures. For every hit:

    normal          distance from the beam line along its sector's normal (m): the radius of a barrel
                    tube or strip layer, or the radius an endcap tube or TGC wire group measures
    z               beam coordinate (m)
    cos_phi_s/sin_phi_s   the sector normal's direction (perpendicular to the tube or strip)
    cos_phi/sin_phi the hit's direction from the beam line (strips measure phi with it)
    barrel          1: measures z on a surface of fixed normal distance (barrel MDT, RPC);
                    0: measures the normal distance on a surface of fixed z (endcap MDT, TGC)
    mdt             1 for drift tubes (a drift circle), 0 for strips (a point)
    drift           drift radius (m), 0 for strips
    sigma           precision-coordinate resolution (m): the stored covariance, plus the chambers'
                    nominal alignment precision for tubes
    station         0 inner, 1 middle, 2 outer, 3 extra endcap (EE) MDT station; 4 trigger strips
    multilayer      0 or 1: which of a station's two tube multilayers
    layer           the stored layer number (tube layer 1-8 of a station, or trigger gas gap 1-9)
    time_residual   recorded time minus the time of flight from the vertex to the hit (ns): a tube's
                    drift time, or a strip's distance from the muon's arrival (0 without a time column)

A hit missing any column the fit needs is marked invalid for the fit (`valid` False) and its row
is zero; the network still sees it through its input features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from muonreg import detector as det
from muonreg.data.schema import Technology

GEOMETRY = (
    "normal",
    "z",
    "cos_phi_s",
    "sin_phi_s",
    "cos_phi",
    "sin_phi",
    "barrel",
    "mdt",
    "drift",
    "sigma",
    "station",
    "multilayer",
    "layer",
    "time_residual",
)
G = {name: i for i, name in enumerate(GEOMETRY)}
STATION_GROUPS = 5  # inner, middle, outer, extra (EE), trigger strips
# by station index (BI BM BO BE EI EM EO EE = 0..7): the group, and the tube layers of a multilayer
_GROUP_OF_STATION = np.array([0, 1, 2, 3, 0, 1, 2, 3])
_BARREL = {s.index for s in det.STATIONS if s.barrel}
_LAYERS_PER_MULTILAYER = np.full(8, 4)
for _station in det.STATIONS:
    _LAYERS_PER_MULTILAYER[_station.index] = _station.tube_layers
_NEEDED = [f"spacePoint_globEdge{e}{c}" for e in ("High", "Low") for c in "XYZ"] + [
    "spacePoint_technology",
    "spacePoint_stationIndex",
    "spacePoint_layer",
    "spacePoint_covXX",
    "spacePoint_driftR",
]
TIME = "spacePoint_time"  # optional: only the time residual needs it
MISSING = -999.0


def missing_columns(columns: Sequence[str]) -> list[str]:
    """The columns the track fit needs that a dataset does not have."""
    return [c for c in _NEEDED if c not in columns]


class HitGeometry:
    """Stored hit rows (a dataset's column order) -> (geometry float32 [n, len(GEOMETRY)], valid [n]).

    A dataset without the needed columns gives rows of 0, all invalid (see `missing_columns`).
    """

    def __init__(self, columns: Sequence[str]):
        self._cols = None if missing_columns(columns) else [list(columns).index(c) for c in _NEEDED]
        self._time = list(columns).index(TIME) if TIME in columns else None

    def __call__(self, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._cols is None:
            return np.zeros((len(hits), len(GEOMETRY)), np.float32), np.zeros(len(hits), bool)
        raw = hits[:, self._cols].astype(np.float64)
        valid = (np.isfinite(raw) & (raw != MISSING)).all(1)
        raw = np.where(valid[:, None], raw, 0.0)
        high, low = raw[:, 0:3] * 1e-3, raw[:, 3:6] * 1e-3
        tech, station, layer, cov, drift = raw[:, 6:].T
        centre, axis = (high + low) / 2, high - low
        phi_s = np.arctan2(-axis[:, 0], axis[:, 1])  # the sector normal is perpendicular to the tube/strip
        phi = np.arctan2(centre[:, 1], centre[:, 0])
        mdt = tech == Technology.MDT
        index = np.clip(station.astype(np.int64), 0, 7)
        barrel = np.isin(index, list(_BARREL))
        out = np.zeros((len(hits), len(GEOMETRY)), dtype=np.float32)
        out[:, G["normal"]] = centre[:, 0] * np.cos(phi_s) + centre[:, 1] * np.sin(phi_s)
        out[:, G["z"]] = centre[:, 2]
        out[:, G["cos_phi_s"]], out[:, G["sin_phi_s"]] = np.cos(phi_s), np.sin(phi_s)
        out[:, G["cos_phi"]], out[:, G["sin_phi"]] = np.cos(phi), np.sin(phi)
        out[:, G["barrel"]] = barrel
        out[:, G["mdt"]] = mdt
        out[:, G["drift"]] = np.where(mdt, drift * 1e-3, 0.0)
        alignment = np.where(mdt, det.CHAMBER_ALIGNMENT**2, 0.0)
        out[:, G["sigma"]] = np.sqrt(np.maximum(cov, 0.0) + alignment) * 1e-3
        out[:, G["station"]] = np.where(mdt, _GROUP_OF_STATION[index], STATION_GROUPS - 1)
        out[:, G["multilayer"]] = mdt & (layer > _LAYERS_PER_MULTILAYER[index])
        out[:, G["layer"]] = layer
        if self._time is not None:
            time = hits[:, self._time].astype(np.float64)
            known = np.isfinite(time) & (time != MISSING)
            flight = np.linalg.norm(centre, axis=1) * 1e3 / det.C_MM_PER_NS
            out[:, G["time_residual"]] = np.where(known, time - flight, 0.0)
        valid &= out[:, G["sigma"]] > 0
        out[~valid] = 0.0
        return out, valid

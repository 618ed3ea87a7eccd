"""Hit features: scaling, derived geometry and per-feature missing-value masks.

A feature set is a list of names: on-disk hit columns and the derived `r, s, theta, phi, eta`.
The model's input size is `len(names)`, never written by hand. A value is *missing* when it is
NaN, infinite or one of the configured sentinels; it is masked for that hit and that feature
only (seeds/nan-sentinel-mask-granularity.md) and replaced by 0, so no NaN or sentinel ever
reaches a tensor, and a hit with one missing column keeps all its others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from muonreg.numerics import safe_eta

# Input scaling of the reference loader: positions mm → m, time ns → 1e-5, covariance mm² → m²,
# channel / 1000, stationIndex / 10; every other column is used as stored.
DEFAULT_SCALES: dict[str, float] = {
    **{f"spacePoint_globEdge{e}{c}": 1e-3 for e in ("High", "Low") for c in "XYZ"},
    "spacePoint_time": 1e-5,
    **{f"spacePoint_cov{c}": 1e-6 for c in ("XX", "XY", "YX", "YY")},
    "spacePoint_channel": 1e-3,
    "spacePoint_stationIndex": 0.1,
}

_LOW = ("spacePoint_globEdgeLowX", "spacePoint_globEdgeLowY", "spacePoint_globEdgeLowZ")
# Derived features and the on-disk columns each one needs.
DERIVED: dict[str, tuple[str, ...]] = {
    "r": _LOW[:2],
    "s": _LOW,
    "theta": _LOW,
    "phi": _LOW[:2],
    "eta": _LOW,
}


@dataclass
class HitFeatures:
    """Turns stored hit rows into (values, validity) arrays for a named feature list."""

    names: Sequence[str]
    columns: Sequence[str]  # the dataset's hit_features, in on-disk order
    scales: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SCALES))
    missing_sentinels: Iterable[float] = (-999.0,)

    def __post_init__(self) -> None:
        self.names = list(self.names)
        self.columns = list(self.columns)
        if not self.names:
            raise ValueError("feature list is empty: give at least one hit feature")
        duplicates = sorted({n for n in self.names if self.names.count(n) > 1})
        if duplicates:
            raise ValueError(f"feature list repeats {duplicates}")
        allowed = [*self.columns, *DERIVED]
        unknown = [n for n in self.names if n not in allowed]
        if unknown:
            raise ValueError(
                f"unknown hit feature(s) {unknown}; the dataset has {self.columns} and derived {list(DERIVED)}"
            )
        needed = [n for n in _LOW if n not in self.columns]
        if needed and any(n in DERIVED for n in self.names):
            raise ValueError(f"derived features need the dataset columns {needed}, which it does not have")
        self.missing_sentinels = np.asarray(list(self.missing_sentinels), dtype=np.float32)
        self._index = {c: i for i, c in enumerate(self.columns)}
        self._stored = [n for n in self.names if n in self._index]
        self._stored_cols = np.array([self._index[n] for n in self._stored], dtype=np.int64)
        self._stored_scale = np.array([self.scales.get(n, 1.0) for n in self._stored], dtype=np.float32)
        self._out_stored = np.array([self.names.index(n) for n in self._stored], dtype=np.int64)
        self._derived = [n for n in self.names if n not in self._index]

    @property
    def size(self) -> int:
        return len(self.names)

    def _clean(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        valid = np.isfinite(raw) & ~np.isin(raw, self.missing_sentinels)
        return np.where(valid, raw, 0.0).astype(np.float32), valid

    def __call__(self, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """hits [n, len(columns)] as stored → (x float32 [n, F], valid bool [n, F]); x is 0 where invalid."""
        n = hits.shape[0]
        x = np.zeros((n, self.size), dtype=np.float32)
        valid = np.zeros((n, self.size), dtype=bool)
        values, ok = self._clean(hits[:, self._stored_cols])
        x[:, self._out_stored] = values * self._stored_scale
        valid[:, self._out_stored] = ok
        if self._derived:
            cols = [self._index[c] for c in _LOW]
            low, low_ok = self._clean(hits[:, cols])
            low = low * np.array([self.scales.get(c, 1.0) for c in _LOW], dtype=np.float32)
            derived = derived_features(low[:, 0], low[:, 1], low[:, 2])
            for name in self._derived:
                j = self.names.index(name)
                need = [_LOW.index(c) for c in DERIVED[name]]
                ok_j = low_ok[:, need].all(axis=1)
                x[:, j] = np.where(ok_j, derived[name], 0.0)
                valid[:, j] = ok_j
        return x, valid


def derived_features(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
    """r, s, theta, phi, eta of points; finite everywhere, including on the beam axis (theta 0 or pi)."""
    r = np.hypot(x, y)
    s = np.sqrt(r * r + z * z)
    theta = np.arctan2(r, z)  # = arccos(z/s) without the 0/0 at the origin
    return {
        "r": r,
        "s": s,
        "theta": theta.astype(np.float32),
        "phi": np.arctan2(y, x),
        "eta": safe_eta(z, r),
    }

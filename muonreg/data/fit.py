"""Classical MS-standalone track fit of a muon's hits: the reference the network is compared against.

The fit reads only what is on disk (hit edges, drift radii, covariances, technology, station
codes; truthLink only to pick a muon's hits) and uses the known field and geometry of
`detector.py`. Track plane phi comes from the strip hits (RPC/TGC measure phi). In that plane
three parameters are fitted by Gauss-Newton with the same propagator as the simulator: the
position and direction where the track leaves the calorimeter, and q/p. A first pass uses wire
and strip positions; then MDT drift circles, with the left/right ambiguity of each tube taken on
the side the current track passes. pT at the vertex adds back the mean energy loss; phi undoes
the solenoid's rotation. Many tracks are fitted at once (vectorised over tracks).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from muonreg.data import detector as det
from muonreg.data.schema import Technology

BARREL_STATIONS = {s.index for s in det.STATIONS if s.barrel}
START = det.CALO_RADIUS  # the fit's tracks start where the calorimeter scattering happened
STEPS = int((det.MAX_PATH - START) / det.STEP)
WIRE_SIGMA = det.TUBE_RADIUS / np.sqrt(3)  # first pass: a tube hit as its wire, spread over the tube
MDT_SIGMA = float(np.hypot(det.MDT_RESOLUTION, det.CHAMBER_ALIGNMENT))  # tube resolution and alignment
FD_STEPS = np.array([1e-6, 1e-6, 1e-6])  # finite-difference steps for (psi, alpha, q/p)
MIN_HITS = 4  # three parameters and at least one degree of freedom


def _columns(hits: np.ndarray, index: dict[str, int], name: str) -> np.ndarray:
    return hits[:, index[f"spacePoint_{name}"]]


class Measurements:
    """Hits of many tracks, padded to a common count, in each track's bending plane."""

    def __init__(self, tracks: list[np.ndarray], index: dict[str, int]):
        n, width = len(tracks), max(len(t) for t in tracks)
        shape = (n, width)
        self.valid = np.zeros(shape, bool)
        self.is_mdt = np.zeros(shape, bool)
        self.barrel = np.zeros(shape, bool)
        self.target = np.zeros(shape)  # the surface: in-plane rho (barrel) or folded z (endcap)
        self.position = np.zeros(
            shape
        )  # measured other coordinate: folded z (barrel) or sector-frame rho (endcap)
        self.cos_dphi = np.ones(shape)
        self.drift = np.zeros(shape)
        self.sigma = np.ones(shape)
        self.side = np.ones(n)
        self.phi = np.zeros(n)
        for t, hits in enumerate(tracks):
            self._fill(t, hits, index)

    def _fill(self, t: int, hits: np.ndarray, index: dict[str, int]) -> None:
        low = np.stack([_columns(hits, index, f"globEdgeLow{c}") for c in "XYZ"], 1)
        high = np.stack([_columns(hits, index, f"globEdgeHigh{c}") for c in "XYZ"], 1)
        centre, axis = (low + high) / 2, high - low
        tech = _columns(hits, index, "technology")
        station = _columns(hits, index, "stationIndex")
        phi_s = np.arctan2(-axis[:, 0], axis[:, 1])  # the sector normal is perpendicular to the tube/strip
        strips = tech != Technology.MDT
        # the track plane's phi: strips measure it; without strips the sector direction is all we have
        source = np.arctan2(centre[strips, 1], centre[strips, 0]) if strips.any() else phi_s
        phi = np.arctan2(np.sin(source).mean(), np.cos(source).mean())
        n = len(hits)
        side = 1.0 if np.median(centre[:, 2]) >= 0 else -1.0  # fit in the frame folded to z > 0
        z = centre[:, 2] * side
        barrel = np.isin(station, list(BARREL_STATIONS))
        normal = centre[:, 0] * np.cos(phi_s) + centre[:, 1] * np.sin(phi_s)
        cos_dphi = np.cos(phi - phi_s)
        self.valid[t, :n] = True
        self.is_mdt[t, :n] = ~strips
        self.barrel[t, :n] = barrel
        self.target[t, :n] = np.where(barrel, normal / cos_dphi, z)
        self.position[t, :n] = np.where(barrel, z, normal)
        self.cos_dphi[t, :n] = cos_dphi
        self.drift[t, :n] = np.nan_to_num(_columns(hits, index, "driftR"))
        self.sigma[t, :n] = np.where(strips, np.sqrt(_columns(hits, index, "covXX")), MDT_SIGMA)
        self.side[t] = side
        self.phi[t] = phi


def _track(params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trajectories (rho, z, alpha) in the folded frame from params [tracks, 3] = (psi, alpha, q/p there).

    Folding z -> -z mirrors the bending, so q/p in the folded frame is the true q/p times the side.
    """
    psi, alpha, qp = params.T
    return det.propagate(START * np.cos(psi), START * np.sin(psi), alpha, qp, n_steps=STEPS)


def _residuals(
    params: np.ndarray, m: Measurements, drift_signs: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised residuals [tracks, hits] (0 where padded), and the signed track-to-wire distances."""
    rho, z, alpha = _track(params)
    b_found, b_z, b_alpha, _ = det.crossing(rho, z, alpha, np.where(m.barrel, m.target, 1e9))
    e_found, e_rho, e_alpha, _ = det.crossing(z, rho, alpha, np.where(m.barrel, 1e9, m.target))
    found = np.where(m.barrel, b_found, e_found)
    # predicted measured coordinate and the inclination that turns a coordinate offset into a distance
    predicted = np.where(m.barrel, b_z, e_rho * m.cos_dphi)
    incline = np.where(m.barrel, np.abs(np.cos(b_alpha)), np.abs(np.sin(e_alpha)))
    offset = predicted - m.position
    signed = offset * np.where(m.is_mdt, incline, 1.0)
    if drift_signs is None:  # first pass: wires and strips as points
        res = signed / np.where(m.is_mdt, WIRE_SIGMA, m.sigma)
    else:
        res = np.where(m.is_mdt, (signed - drift_signs * m.drift) / m.sigma, signed / m.sigma)
    ok = m.valid & found
    return np.where(ok, res, np.where(m.valid, 50.0, 0.0)), signed


def _gauss_newton(params: np.ndarray, m: Measurements, signs_from_track: bool, iterations: int) -> np.ndarray:
    signs = None
    for _ in range(iterations):
        res, signed = _residuals(params, m, signs)
        if signs_from_track:
            signs = np.where(signed >= 0, 1.0, -1.0)
            res, _ = _residuals(params, m, signs)
        jac = np.stack(
            [
                (_residuals(params + np.eye(3)[k] * FD_STEPS[k], m, signs)[0] - res) / FD_STEPS[k]
                for k in range(3)
            ],
            -1,
        )
        jac, res = np.nan_to_num(jac), np.nan_to_num(res)
        jtj = np.einsum("thk,thl->tkl", jac, jac)
        jtr = np.einsum("thk,th->tk", jac, res)
        step = (np.linalg.pinv(jtj) @ -jtr[..., None])[..., 0]  # pinv: a degenerate track just stops moving
        params = params + np.clip(step, -0.2, 0.2)
    return params


def _initial(m: Measurements) -> np.ndarray:
    """A straight line from the origin through the measured points' centre of gravity."""
    rho = np.where(m.barrel, m.target, m.position / m.cos_dphi)
    z = np.where(m.barrel, m.position, m.target)
    w = m.valid.astype(float)
    angle = np.arctan2((z * w).sum(1), (rho * w).sum(1))
    return np.stack([angle, angle, np.zeros(len(angle))], 1)


def fit_tracks(tracks: list[np.ndarray], index: dict[str, int], batch: int = 500) -> dict[str, np.ndarray]:
    """Fit many muons, `batch` at a time; each entry of `tracks` holds one muon's hits (on-disk columns)."""
    parts = [_fit_batch(tracks[i : i + batch], index) for i in range(0, len(tracks), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _fit_batch(tracks: list[np.ndarray], index: dict[str, int]) -> dict[str, np.ndarray]:
    m = Measurements(tracks, index)
    params = _gauss_newton(_initial(m), m, signs_from_track=False, iterations=6)
    params = _gauss_newton(params, m, signs_from_track=True, iterations=5)
    res, _ = _residuals(params, m, np.where(_residuals(params, m, None)[1] >= 0, 1.0, -1.0))
    ndf = m.valid.sum(1) - 3
    chi2 = (res**2).sum(1)
    _, alpha, qp = params.T
    q = np.where(qp * m.side >= 0, 1.0, -1.0)
    p_ms = 1.0 / np.maximum(np.abs(qp), 1e-6)
    eta = np.arcsinh(np.tan(alpha)) * m.side
    pt = (p_ms + det.MEAN_ENERGY_LOSS) / np.cosh(eta)
    phi = np.angle(np.exp(1j * (m.phi + q * det.SOLENOID_PHI_KICK / pt)))
    enough = np.array([len(t) >= MIN_HITS for t in tracks])
    ok = enough & (ndf > 0) & np.isfinite(params).all(1) & (np.abs(alpha) < np.pi / 2)
    return {"pt": pt, "eta": eta, "phi": phi, "q": q, "chi2_ndf": chi2 / np.maximum(ndf, 1), "ok": ok}


def fit_track(hits: np.ndarray, hit_index: dict[str, int]) -> dict | None:
    """Fit one muon's hits; None when they are too few (fewer than MIN_HITS) or the fit fails."""
    if len(hits) < MIN_HITS:
        return None
    result = {k: v[0] for k, v in fit_tracks([hits], hit_index).items()}
    if not result.pop("ok"):
        return None
    return {k: float(v) for k, v in result.items()}


def fit_events(reader, indices: Iterable[int]) -> dict[str, np.ndarray]:
    """Fit the truth hits of every muon of the given dataset events; one row per muon."""
    link_col = reader.hit_index["spacePoint_truthLink"]
    col = reader.track_index
    rows: dict[str, list] = {k: [] for k in ("event", "track", "pt_true", "eta_true", "phi_true", "q_true")}
    muons: list[np.ndarray] = []
    for i in indices:
        event = reader.read(int(i))
        for k, track in enumerate(event.tracks):
            rows["event"].append(int(i))
            rows["track"].append(k)
            for f in ("pt", "eta", "phi", "q"):
                rows[f"{f}_true"].append(track[col[f"truthMuon_{f}"]])
            muons.append(event.hits[event.hits[:, link_col] == k])
    out = {k: np.asarray(v) for k, v in rows.items()}
    if muons:
        out.update(fit_tracks(muons, reader.hit_index))
    return out

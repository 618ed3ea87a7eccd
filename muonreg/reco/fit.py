"""Classical MS-standalone track fit of a muon's hits: the reference the network is compared against.

The fit reads only what is on disk (hit edges, drift radii, covariances, technology, station
codes; truthLink only to pick a muon's hits) and knows the nominal field and geometry of
`muonreg.detector`, the alignment precision, and the calibrated energy-loss table; never the
simulator's per-event truth. Track plane phi comes from the strip hits (RPC/TGC measure phi). In
that plane three parameters are fitted by Gauss-Newton with the nominal propagator: the position
and direction where the track leaves the calorimeter, and q/p. A first pass uses wire and strip
positions; then MDT drift circles, with the left/right ambiguity of each tube taken on the side the
current track passes. pT at the vertex adds back the expected energy loss; phi undoes the
solenoid's rotation. With `robust=True` hits far from the track (wrongly assigned ones) are
dropped with a tightening cut, as real track fits reject outliers. Hits with a missing value
(NaN, inf, -999) in a column the fit needs are left out. Vectorised over tracks.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat

import numpy as np

from muonreg import detector as det
from muonreg.data.schema import Technology
from muonreg.machine import usable_cores
from muonreg.numerics import FINITE_DIFFERENCE_STEP, safe_inverse
from muonreg.reco.energy_loss import expected_loss

BARREL_STATIONS = {s.index for s in det.STATIONS if s.barrel}
LAYERS_PER_MULTILAYER = {s.index: s.tube_layers for s in det.STATIONS}
START = det.CALO_RADIUS  # the fit's tracks start where the calorimeter scattering happened
STEPS = int((det.MAX_PATH - START) / det.STEP)
WIRE_SIGMA = det.TUBE_RADIUS / np.sqrt(3)  # first pass: a tube hit as its wire, spread over the tube
MIN_HITS = 4  # three parameters and at least one degree of freedom
MIN_TRACKS_PER_WORKER = 500  # ~4 s of fitting: more than a worker costs to start
# Outlier rejection (robust=True): normalised-residual cuts of successive iterations, loosest first.
WIRE_CUTS = (30.0, 12.0, 6.0, 4.0)
DRIFT_CUTS = (40.0, 15.0, 8.0, 5.0)
MISSING = -999.0  # the sentinel of a value that was not measured
NEEDED = [f"globEdge{e}{c}" for e in ("High", "Low") for c in "XYZ"] + [
    "technology",
    "stationIndex",
    "layer",
    "covXX",
]
PHI_WINDOW = 0.05  # rad: strips further than this from the track's phi are not its hits (robust fit)
SUSPECT_CHI2 = 8.0  # chi2/ndf above which a track's drift-circle sides are searched again
# Sides searched: each multilayer alone, then both multilayers of a station together (a mirror image).
FLIPS = [(station, ml) for station in sorted(LAYERS_PER_MULTILAYER) for ml in (0, 1, None)]


def _columns(hits: np.ndarray, index: dict[str, int], name: str) -> np.ndarray:
    return hits[:, index[f"spacePoint_{name}"]]


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _track_phi(
    phi: np.ndarray, phi_s: np.ndarray, strips: np.ndarray, robust: bool
) -> tuple[float, np.ndarray]:
    """(phi of the track plane, the hits that can belong to it). Strips measure phi; without strips
    the sector direction is all there is. Robust: the phi most strips (or sectors) agree with, and
    only hits in its sector (a plain fit trusts every hit it is given)."""
    source = phi[strips] if strips.any() else phi_s
    if robust:
        near = np.abs(_wrap(source[:, None] - source[None, :])) < PHI_WINDOW
        source = source[near[near.sum(1).argmax()]]
    track = float(np.arctan2(np.sin(source).mean(), np.cos(source).mean()))
    if not robust:
        return track, np.ones(len(phi), bool)
    same = np.abs(_wrap(phi_s - track)) < det.SECTOR_WIDTH
    return track, same & (~strips | (np.abs(_wrap(phi - track)) < PHI_WINDOW))


def usable_hits(hits: np.ndarray, index: dict[str, int]) -> np.ndarray:
    """The hits whose columns the fit needs are all measured (MDT hits also need a drift radius)."""
    needed = np.stack([_columns(hits, index, name) for name in NEEDED], 1)
    ok = (np.isfinite(needed) & (needed != MISSING)).all(1)
    drift = _columns(hits, index, "driftR")
    mdt = _columns(hits, index, "technology") == Technology.MDT
    ok &= ~mdt | (np.isfinite(drift) & (drift != MISSING))
    return hits[ok]


class Measurements:
    """Hits of many tracks, padded to a common count, in each track's bending plane."""

    def __init__(self, tracks: list[np.ndarray], index: dict[str, int], robust: bool = False):
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
        self.station = np.full(shape, -1)  # MDT station index (-1: strips and padding)
        self.multilayer = np.zeros(shape, int)
        self.side = np.ones(n)
        self.phi = np.zeros(n)
        for t, hits in enumerate(tracks):
            self._fill(t, usable_hits(hits, index), index, robust)

    def _fill(self, t: int, hits: np.ndarray, index: dict[str, int], robust: bool) -> None:
        if len(hits) == 0:
            return  # nothing to fit: the track stays invalid
        low = np.stack([_columns(hits, index, f"globEdgeLow{c}") for c in "XYZ"], 1)
        high = np.stack([_columns(hits, index, f"globEdgeHigh{c}") for c in "XYZ"], 1)
        centre, axis = (low + high) / 2, high - low
        phi_s = np.arctan2(-axis[:, 0], axis[:, 1])  # the sector normal is perpendicular to the tube/strip
        strips = _columns(hits, index, "technology") != Technology.MDT
        phi, same_sector = _track_phi(np.arctan2(centre[:, 1], centre[:, 0]), phi_s, strips, robust)
        hits, centre, phi_s, strips = (
            hits[same_sector],
            centre[same_sector],
            phi_s[same_sector],
            strips[same_sector],
        )
        station = _columns(hits, index, "stationIndex")
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
        self.drift[t, :n] = np.where(strips, 0.0, _columns(hits, index, "driftR"))
        # MDT: the drift-radius resolution on disk and the chambers' alignment precision
        precision = _columns(hits, index, "covXX")
        self.sigma[t, :n] = np.sqrt(precision + np.where(strips, 0.0, det.CHAMBER_ALIGNMENT**2))
        self.station[t, :n] = np.where(strips, -1, station).astype(int)
        per_ml = np.array([LAYERS_PER_MULTILAYER.get(int(k), 8) for k in station])
        self.multilayer[t, :n] = _columns(hits, index, "layer") > per_ml
        self.side[t] = side
        self.phi[t] = phi

    def subset(self, rows: np.ndarray) -> Measurements:
        """The measurements of some tracks only (a view for re-fitting them)."""
        out = object.__new__(Measurements)
        out.__dict__ = {k: v[rows] for k, v in self.__dict__.items()}
        return out

    def reject(self, res: np.ndarray, cut: float) -> None:
        """Drop hits whose |normalised residual| exceeds `cut`, keeping MIN_HITS per track at least."""
        far = self.valid & (np.abs(res) > cut)
        enough = (self.valid & ~far).sum(1) >= MIN_HITS
        self.valid &= ~(far & enough[:, None])


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


def _gauss_newton(
    params: np.ndarray,
    m: Measurements,
    signs: str | np.ndarray | None,
    cuts: tuple[float, ...] | None,
    iterations: int,
) -> np.ndarray:
    """Gauss-Newton steps. `signs`: None fits wires as points, "track" takes each drift circle on
    the side the current track passes, an array fixes the sides. With `cuts`, outliers are
    rejected before each step, by a tightening cut."""
    for it in range(iterations):
        track_sides = isinstance(signs, str)
        current = np.where(_residuals(params, m, None)[1] >= 0, 1.0, -1.0) if track_sides else signs
        res, _ = _residuals(params, m, current)
        if cuts:
            m.reject(res, cuts[min(it, len(cuts) - 1)])
            res, _ = _residuals(params, m, current)
        jac = np.stack(
            [
                (_residuals(params + np.eye(3)[k] * FINITE_DIFFERENCE_STEP, m, current)[0] - res)
                / FINITE_DIFFERENCE_STEP
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


def _chi2(params: np.ndarray, m: Measurements) -> tuple[np.ndarray, np.ndarray]:
    """(chi2 with each drift circle on the track's side, those sides)."""
    signs = np.where(_residuals(params, m, None)[1] >= 0, 1.0, -1.0)
    return (_residuals(params, m, signs)[0] ** 2).sum(1), signs


def _resolve_sides(params: np.ndarray, m: Measurements) -> np.ndarray:
    """Escape mirror solutions: a multilayer or station whose drift circles all sit on the wrong side
    of the wires can hold a fit in a false minimum. For suspect tracks, flip each multilayer's and
    each station's sides in turn, refit, and keep whatever lowers the chi2."""
    chi2, signs = _chi2(params, m)
    suspect = np.nonzero(chi2 / np.maximum(m.valid.sum(1) - 3, 1) > SUSPECT_CHI2)[0]
    if len(suspect) == 0:
        return params
    sub, best = m.subset(suspect), params[suspect]
    best_chi2, best_signs = chi2[suspect], signs[suspect]
    for station, ml in FLIPS:
        group = (sub.station == station) & (True if ml is None else sub.multilayer == ml)
        rows = np.nonzero(group.any(1))[0]  # only the tracks that cross this group
        if len(rows) == 0:
            continue
        trial_m, signs = sub.subset(rows), best_signs[rows]
        trial = _gauss_newton(best[rows], trial_m, np.where(group[rows], -signs, signs), None, iterations=2)
        trial = _gauss_newton(trial, trial_m, "track", None, iterations=2)
        trial_chi2, trial_signs = _chi2(trial, trial_m)
        better = rows[trial_chi2 < best_chi2[rows]]
        keep = trial_chi2 < best_chi2[rows]
        best[better], best_chi2[better], best_signs[better] = trial[keep], trial_chi2[keep], trial_signs[keep]
    params = params.copy()
    params[suspect] = best
    return params


def _initial(m: Measurements) -> np.ndarray:
    """A straight line from the origin through the measured points' centre of gravity."""
    rho = np.where(m.barrel, m.target, m.position / m.cos_dphi)
    z = np.where(m.barrel, m.position, m.target)
    w = m.valid.astype(float)
    angle = np.arctan2((z * w).sum(1), (rho * w).sum(1))
    return np.stack([angle, angle, np.zeros(len(angle))], 1)


def fit_tracks(
    tracks: list[np.ndarray],
    index: dict[str, int],
    batch: int = 2000,
    robust: bool = False,
    workers: int | None = None,
) -> dict[str, np.ndarray]:
    """Fit many muons, `batch` at a time; each entry of `tracks` holds one muon's hits (on-disk columns).

    `robust`: reject outliers (hits that are not the muon's), as a fit of a tracker's hits must.
    `workers`: processes sharing the tracks (default: the cores this process may use, one per
    MIN_TRACKS_PER_WORKER tracks); numpy runs each fit on one core, and an evaluation has nothing
    else to do meanwhile. Returns pt, the momentum measured after the calorimeters p_ms, eta, phi, q,
    chi2_ndf, the hits used and `ok` per track.
    """
    workers = max(1, min(workers or usable_cores(), len(tracks) // MIN_TRACKS_PER_WORKER))
    size = min(batch, -(-len(tracks) // workers))
    chunks = [tracks[i : i + size] for i in range(0, len(tracks), size)]
    if workers == 1:
        parts = [_fit_batch(chunk, index, robust) for chunk in chunks]
    else:  # forked from a clean server process started once (not from the caller and its threads)
        with ProcessPoolExecutor(workers, mp_context=_forkserver()) as pool:
            parts = list(pool.map(_fit_batch, chunks, repeat(index), repeat(robust)))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _forkserver() -> mp.context.BaseContext:
    """The forkserver context. A new process takes up its parent's process-wide start method; in a
    joblib (loky) worker, such as a job of a `hydra/launcher=joblib` sweep, that is 'loky', which no
    plain process knows: such a worker switches to forkserver first."""
    method = mp.get_start_method(allow_none=True)  # None: not set yet, left alone
    if method is not None and method not in mp.get_all_start_methods():
        mp.set_start_method("forkserver", force=True)
    return mp.get_context("forkserver")


def _fit_batch(tracks: list[np.ndarray], index: dict[str, int], robust: bool) -> dict[str, np.ndarray]:
    m = Measurements(tracks, index, robust)
    params = _gauss_newton(_initial(m), m, None, WIRE_CUTS if robust else None, iterations=6)
    params = _gauss_newton(params, m, "track", DRIFT_CUTS if robust else None, iterations=5)
    params = _resolve_sides(params, m)
    chi2, _ = _chi2(params, m)
    used = m.valid.sum(1)
    ndf = used - 3
    _, alpha, qp = params.T
    q = np.where(qp * m.side >= 0, 1.0, -1.0)
    p_ms = safe_inverse(np.abs(qp))
    eta = np.arcsinh(np.tan(alpha)) * m.side
    pt = (p_ms + expected_loss(p_ms, eta)) / np.cosh(eta)
    phi = np.angle(np.exp(1j * (m.phi + q * det.SOLENOID_PHI_KICK / pt)))
    ok = (used >= MIN_HITS) & np.isfinite(params).all(1) & (np.abs(alpha) < np.pi / 2)
    return {
        "pt": pt,
        "p_ms": p_ms,
        "eta": eta,
        "phi": phi,
        "q": q,
        "chi2_ndf": chi2 / np.maximum(ndf, 1),
        "hits_used": used,
        "ok": ok,
    }


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

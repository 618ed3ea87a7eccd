"""Detector simulator: events of 1-2 muons in the ATLAS Muon Spectrometer, in the hepattn layout.

    python -m muonreg.data.simulate --events N --out DIR [--seed S] [--files K] [--multiplicity high]
    python -m muonreg.data.simulate --default      # the dataset `python train.py` uses

Physics (DESIGN section 3): muons from the beam spot with a configurable pT spectrum; the
solenoid turns phi by 0.36 q/pT; the calorimeters take ~3 GeV (Landau-like tail) and scatter by
~0.15 rad GeV/p; the toroid bends in r-z with curvature 0.3 B q/p; chambers scatter a little
more. MDT tubes (14.6 mm radius, 80 um) measure drift radii in the bending plane; RPC/TGC strips
measure both coordinates coarsely (95 % efficient, clusters of 1-3 strips). Noise: random tubes
and strips in the chambers a muon crosses (the real data is hit-filtered around the muons),
delta-ray neighbours of true tube hits, and a few hits elsewhere. Columns a technology does not
measure (driftR of strips) are NaN; the feature pipeline masks them per feature.

Everything is vectorised over the muons of a chunk of events; a seed fixes every byte.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from muonreg.data import detector as det
from muonreg.data.format import DatasetWriter
from muonreg.data.schema import HIT_FEATURES, NOISE_LINK, Technology

COL = {name: i for i, name in enumerate(HIT_FEATURES)}
MULTIPLICITIES = ("default", "high")
SPECTRA = ("flat_qpt", "flat_pt", "falling")
MAX_EVENTS_PER_FILE = 100_000
CHUNK_EVENTS = 2000


@dataclass(frozen=True)
class SimulationConfig:
    """Every setting of the simulator (all of it keys the dataset cache)."""

    multiplicity: str = "default"  # "default": ~90 hits/event; "high": 60-600 hits, mean ~330
    noise_scale: float = 1.0  # multiplies every noise rate
    pt_spectrum: str = "flat_qpt"  # flat in q/pT, flat in pT, or falling as pT^-3
    pt_min: float = 5.0
    pt_max: float = 200.0
    eta_max: float = 2.7
    two_muon_fraction: float = 0.5
    max_hits: int = 600
    min_hits_per_muon: int = 3
    mdt_efficiency: float = 0.97
    trigger_efficiency: float = 0.95
    calo_scattering: float = 0.15  # rad GeV / p
    ms_scattering: float = 0.015  # rad GeV / p per station crossed
    energy_loss_width: float = 0.25  # GeV, scale of the Landau-like tail
    alignment: float = det.CHAMBER_ALIGNMENT  # mm, random chamber displacement along the precision coordinate
    mdt_noise_per_station: float = 6.5  # noise tubes per crossed MDT station (default multiplicity)
    strip_noise_per_station: float = 1.0
    delta_ray_probability: float = 0.04
    stray_noise_per_event: float = 2.0

    def __post_init__(self) -> None:
        if self.multiplicity not in MULTIPLICITIES:
            raise ValueError(f"multiplicity={self.multiplicity!r} must be one of {list(MULTIPLICITIES)}")
        if self.pt_spectrum not in SPECTRA:
            raise ValueError(f"pt_spectrum={self.pt_spectrum!r} must be one of {list(SPECTRA)}")
        if not 0 < self.pt_min < self.pt_max:
            raise ValueError(f"need 0 < pt_min < pt_max, got {self.pt_min}, {self.pt_max}")
        if not 0 < self.eta_max <= 2.7:
            raise ValueError(f"eta_max={self.eta_max} must be in (0, 2.7]")
        if self.noise_scale < 0:
            raise ValueError(f"noise_scale={self.noise_scale} must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


# -- muons -------------------------------------------------------------------------------------
def _sample_pt(rng: np.random.Generator, n: int, cfg: SimulationConfig) -> np.ndarray:
    u = rng.random(n)
    lo, hi = cfg.pt_min, cfg.pt_max
    if cfg.pt_spectrum == "flat_pt":
        return lo + u * (hi - lo)
    if cfg.pt_spectrum == "flat_qpt":
        return 1.0 / (1.0 / hi + u * (1.0 / lo - 1.0 / hi))
    return 1.0 / np.sqrt(1.0 / lo**2 - u * (1.0 / lo**2 - 1.0 / hi**2))  # dN/dpT ~ pT^-3


@dataclass
class Muons:
    event: np.ndarray
    pt: np.ndarray
    eta: np.ndarray
    phi: np.ndarray
    q: np.ndarray
    phi_ms: np.ndarray  # direction of the track plane in the spectrometer
    p_ms: np.ndarray  # momentum after the calorimeters (0: stopped)
    sector: np.ndarray
    phi_s: np.ndarray
    large: np.ndarray
    rho: np.ndarray  # trajectories [muons, steps]
    z: np.ndarray
    alpha: np.ndarray


def generate_muons(rng: np.random.Generator, n_events: int, cfg: SimulationConfig) -> Muons:
    count = 1 + (rng.random(n_events) < cfg.two_muon_fraction)
    event = np.repeat(np.arange(n_events), count)
    n = len(event)
    pt = _sample_pt(rng, n, cfg)
    eta = rng.uniform(-cfg.eta_max, cfg.eta_max, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    q = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    p = pt * np.cosh(eta)
    # Landau-like energy loss (Moyal: -ln Z^2) around the mean, capped at the whole momentum
    moyal = np.minimum(-np.log(np.maximum(rng.standard_normal(n) ** 2, 1e-300)), 40.0)
    loss = det.MEAN_ENERGY_LOSS + cfg.energy_loss_width * (moyal - (np.euler_gamma + np.log(2)))
    p_ms = np.where(p - loss > 1.5, p - loss, 0.0)
    p_scatter = np.maximum(p_ms, 1.0)
    phi_ms = phi - q * det.SOLENOID_PHI_KICK / pt + rng.normal(0, cfg.calo_scattering, n) / p
    sector, phi_s, large = det.sector_of(phi_ms)
    kinks = {det.CALO_RADIUS: rng.normal(0, cfg.calo_scattering, n) / p}
    for s in (7500.0, 11000.0, 15000.0):  # chambers, toroid coils and supports
        kinks[s] = rng.normal(0, cfg.ms_scattering, n) / p_scatter
    vertex_z = rng.normal(0, 50.0, n)
    rho, z, alpha = det.propagate(np.zeros(n), vertex_z, np.arctan(np.sinh(eta)), q / p_scatter, kinks=kinks)
    return Muons(event, pt, eta, phi, q, phi_ms, p_ms, sector, phi_s, large, rho, z, alpha)


# -- hit rows ----------------------------------------------------------------------------------
@dataclass
class HitBlock:
    """Hit rows with the generated muon they belong to (truth) or were made near (noise)."""

    rows: np.ndarray
    muon: np.ndarray
    truth: np.ndarray


def _place(
    rows, centre, axis_phi, half_length, z, cov, tech, channel, layer, sector, station_eta, index
) -> None:
    """Fill the geometric and identifier columns; a hit is a segment along its tube or strip."""
    ux, uy = -np.sin(axis_phi), np.cos(axis_phi)
    for edge, sign in (("High", 1.0), ("Low", -1.0)):
        rows[:, COL[f"spacePoint_globEdge{edge}X"]] = centre[0] + sign * half_length * ux
        rows[:, COL[f"spacePoint_globEdge{edge}Y"]] = centre[1] + sign * half_length * uy
        rows[:, COL[f"spacePoint_globEdge{edge}Z"]] = z
    rows[:, COL["spacePoint_readOutSide"]] = np.where(z >= 0, 1.0, -1.0)  # detector side A or C
    rows[:, COL["spacePoint_covXX"]] = cov[0]
    rows[:, COL["spacePoint_covXY"]] = 0.0
    rows[:, COL["spacePoint_covYX"]] = 0.0
    rows[:, COL["spacePoint_covYY"]] = cov[1]
    rows[:, COL["spacePoint_channel"]] = channel
    rows[:, COL["spacePoint_layer"]] = layer
    rows[:, COL["spacePoint_stationPhi"]] = sector // 2 + 1
    rows[:, COL["spacePoint_stationEta"]] = station_eta
    rows[:, COL["spacePoint_stationIndex"]] = index
    rows[:, COL["spacePoint_technology"]] = int(tech)


def _drift_time(radius: np.ndarray) -> np.ndarray:
    return det.MAX_DRIFT_TIME * (np.clip(radius, 0, det.TUBE_RADIUS) / det.TUBE_RADIUS) ** 1.5


def _tube_rows(station: det.Station, layer, tube, sector, phi_s, large, side, drift, time) -> np.ndarray:
    """MDT hits in tube `tube` of tube layer `layer`; driftR and time as given."""
    base = np.where(large, station.position[0], station.position[1]) + det.tube_layer_offsets(station)[layer]
    along = (tube + 0.5 + 0.5 * (layer % 2)) * det.TUBE_PITCH  # hexagonal stagger
    half = np.where(large, 1.3, 0.9) * np.tan(det.SECTOR_WIDTH / 2)
    if station.barrel:  # tubes stacked along z, numbered with the sign of z; `side` is not used
        normal, z = base, along
        chamber = np.sign(along) * (np.floor(np.abs(along) / station.chamber_length) + 1)
    else:  # tubes stacked in radius on the wheel at side * |z|
        normal, z = along, base * side
        chamber = side * (np.floor(along / station.chamber_length) + 1)
    rows = np.full((len(tube), len(HIT_FEATURES)), np.nan)
    _place(
        rows,
        (normal * np.cos(phi_s), normal * np.sin(phi_s)),
        phi_s,
        half * normal,
        z,
        (det.MDT_RESOLUTION**2, (2 * half * normal) ** 2 / 12),
        Technology.MDT,
        np.abs(tube) + 1,
        layer + 1,
        sector,
        chamber,
        station.index,
    )
    rows[:, COL["spacePoint_driftR"]] = drift
    rows[:, COL["spacePoint_time"]] = time
    return rows


def _strip_rows(lay: det.TriggerLayer, m: Muons, sel, strip, dphi, time) -> np.ndarray:
    """Strip hits: the bending coordinate from the strip number, phi from the crossing phi strip."""
    base = np.where(m.large[sel], lay.position[0], lay.position[1])
    side = np.where(m.eta[sel] >= 0, 1.0, -1.0)
    measured = (strip + 0.5) * lay.pitch
    phi_s = m.phi_s[sel]
    if lay.barrel:  # strips numbered along z with its sign
        along = (np.floor(base * np.tan(dphi) / lay.phi_pitch) + 0.5) * lay.phi_pitch
        centre = (base * np.cos(phi_s) - along * np.sin(phi_s), base * np.sin(phi_s) + along * np.cos(phi_s))
        axis, half, z = phi_s, lay.phi_pitch / 2, measured
        phi_cov = lay.phi_pitch**2 / 12
        side = np.sign(measured)
        chamber = np.floor(np.abs(measured) / 2400.0) + 1
    else:  # wire groups measure the radius in the chamber frame, radial strips measure phi
        along = measured * np.tan((np.floor(dphi / lay.phi_pitch) + 0.5) * lay.phi_pitch)
        centre = (
            measured * np.cos(phi_s) - along * np.sin(phi_s),
            measured * np.sin(phi_s) + along * np.cos(phi_s),
        )
        axis, half, z = phi_s, measured * lay.phi_pitch / 2, base * side

        phi_cov = (measured * lay.phi_pitch) ** 2 / 12
        chamber = np.floor(measured / 2000.0) + 1
    rows = np.full((len(sel), len(HIT_FEATURES)), np.nan)
    _place(
        rows,
        centre,
        axis,
        half,
        z,
        (lay.pitch**2 / 12, phi_cov),
        lay.technology,
        np.abs(strip) + 1,
        lay.layer,
        m.sector[sel],
        chamber * side,
        lay.station_index,
    )
    rows[:, COL["spacePoint_time"]] = time
    return rows


def _station_crossings(m: Muons, station: det.Station):
    """Crossings of every tube layer of `station`, arrays [muons, layers]: (ok, coordinate, alpha, path).

    The coordinate is z for the barrel and the sector-frame radius for the endcap.
    """
    cos_dphi = np.cos(m.phi_ms - m.phi_s)
    base = np.where(m.large, station.position[0], station.position[1])[:, None] + det.tube_layer_offsets(
        station
    )
    if station.barrel:
        found, along, alpha, path = det.crossing(m.rho, m.z, m.alpha, base / cos_dphi[:, None])
    else:
        side = np.where(m.eta >= 0, 1.0, -1.0)[:, None]
        found, along, alpha, path = det.crossing(m.z * side, m.rho, m.alpha, base)
        along = along * cos_dphi[:, None]
    covered = (np.abs(along) >= station.extent[0]) & (np.abs(along) <= station.extent[1])
    ok = found & covered & (m.p_ms[:, None] > 0)
    return ok, along, alpha, path


def mdt_hits(
    rng: np.random.Generator, m: Muons, occupancy: np.ndarray, cfg: SimulationConfig
) -> list[HitBlock]:
    """True tube hits, delta-ray neighbours, and noise tubes in every MDT chamber a muon crosses."""
    blocks = []
    side = np.where(m.eta >= 0, 1.0, -1.0)
    for station in det.STATIONS:
        ok, along, alpha, path = _station_crossings(m, station)
        mu, layer = np.nonzero(ok)
        if len(mu) == 0:
            continue
        coord = along[mu, layer] + rng.normal(0, cfg.alignment, len(m.pt))[mu]  # chamber misalignment
        # inclination to the layer plane: how far the track passes from the neighbouring wires
        incline = np.abs(np.cos(alpha[mu, layer])) if station.barrel else np.abs(np.sin(alpha[mu, layer]))
        stagger = 0.5 + 0.5 * (layer % 2)
        nearest = np.floor(coord / det.TUBE_PITCH - stagger + 0.5)
        tof = path[mu, layer] * det.STEP / det.C_MM_PER_NS
        for delta in (-1, 0, 1):
            tube = nearest + delta
            dist = np.abs(coord - (tube + stagger) * det.TUBE_PITCH) * incline
            i = np.nonzero(
                (dist < det.TUBE_RADIUS)
                & (station.barrel | (tube >= 0))
                & (rng.random(len(mu)) < cfg.mdt_efficiency)
            )[0]
            drift = np.clip(dist[i] + rng.normal(0, det.MDT_RESOLUTION, len(i)), 0, det.TUBE_RADIUS)
            time = tof[i] + _drift_time(dist[i]) + rng.normal(0, 1.0, len(i))
            sel = mu[i]
            args = (m.sector[sel], m.phi_s[sel], m.large[sel], side[sel])
            blocks.append(
                HitBlock(
                    _tube_rows(station, layer[i], tube[i], *args, drift, time), sel, np.ones(len(i), bool)
                )
            )
            # a delta electron lights up a neighbouring tube: noise right next to a true hit
            j = np.nonzero(rng.random(len(i)) < cfg.delta_ray_probability * cfg.noise_scale)[0]
            neighbour = tube[i][j] + np.where(rng.random(len(j)) < 0.5, -1, 1)
            neighbour = neighbour if station.barrel else np.abs(neighbour)
            radius = rng.uniform(0, det.TUBE_RADIUS, len(j))
            rows = _tube_rows(
                station,
                layer[i][j],
                neighbour,
                *(a[j] for a in args),
                radius,
                time[j] + rng.uniform(0, 100, len(j)),
            )
            blocks.append(HitBlock(rows, sel[j], np.zeros(len(j), bool)))
        # uncorrelated noise tubes in the chamber the muon crosses
        first = np.unique(mu, return_index=True)[1]
        crossed, centre = mu[first], nearest[first]
        count = rng.poisson(cfg.mdt_noise_per_station * occupancy[crossed])
        who = np.repeat(np.arange(len(crossed)), count)
        sel = crossed[who]
        n_layers = len(det.tube_layer_offsets(station))
        tube = centre[who] + rng.integers(-20, 21, len(who))
        tube = tube if station.barrel else np.abs(tube)
        radius = rng.uniform(0, det.TUBE_RADIUS, len(who))
        time = tof[first][who] + rng.uniform(-200, 900, len(who))
        rows = _tube_rows(
            station,
            rng.integers(0, n_layers, len(who)),
            tube,
            m.sector[sel],
            m.phi_s[sel],
            m.large[sel],
            side[sel],
            radius,
            time,
        )
        blocks.append(HitBlock(rows, sel, np.zeros(len(who), bool)))
    return blocks


def strip_hits(
    rng: np.random.Generator, m: Muons, occupancy: np.ndarray, cfg: SimulationConfig
) -> list[HitBlock]:
    """RPC/TGC hits (clusters of 1-3 strips, 70/25/5 %) and noise strips in crossed chambers."""
    blocks = []
    cos_dphi = np.cos(m.phi_ms - m.phi_s)
    side = np.where(m.eta >= 0, 1.0, -1.0)
    dphi = m.phi_ms - m.phi_s
    for lay in det.TRIGGER_LAYERS:
        base = np.where(m.large, lay.position[0], lay.position[1])
        if lay.barrel:
            found, z, _, path = det.crossing(m.rho, m.z, m.alpha, base / cos_dphi)
            coord, rho = z, base / cos_dphi
        else:
            found, rho, _, path = det.crossing(m.z * side[:, None], m.rho, m.alpha, base)
            coord, z = rho * cos_dphi, base
        eta = np.abs(np.arcsinh(np.abs(z) / np.maximum(rho, 1.0)))
        ok = found & (eta >= lay.eta_range[0]) & (eta < lay.eta_range[1]) & (m.p_ms > 0)
        strip = np.floor(coord / lay.pitch)
        tof = path * det.STEP / det.C_MM_PER_NS
        mu = np.nonzero(ok & (rng.random(len(ok)) < cfg.trigger_efficiency))[0]
        u = rng.random(len(mu))
        size = np.where(u < 0.70, 1, np.where(u < 0.95, 2, 3))
        direction = np.where(rng.random(len(mu)) < 0.5, -1, 1)
        for k in range(3):
            sel = mu[size > k]
            offset = k * direction[size > k]
            time = tof[sel] + rng.normal(0, lay.time_resolution, len(sel))
            rows = _strip_rows(lay, m, sel, strip[sel] + offset, dphi[sel], time)
            blocks.append(HitBlock(rows, sel, np.ones(len(sel), bool)))
        crossed = np.nonzero(ok)[0]
        count = rng.poisson(cfg.strip_noise_per_station / 3 * occupancy[crossed])
        sel = crossed[np.repeat(np.arange(len(crossed)), count)]
        noise_strip = strip[sel] + rng.integers(-15, 16, len(sel))
        noise_strip = noise_strip if lay.barrel else np.abs(noise_strip)
        noise_dphi = rng.uniform(-det.SECTOR_WIDTH / 2, det.SECTOR_WIDTH / 2, len(sel))
        time = tof[sel] + rng.uniform(-25, 25, len(sel))
        blocks.append(
            HitBlock(_strip_rows(lay, m, sel, noise_strip, noise_dphi, time), sel, np.zeros(len(sel), bool))
        )
    return blocks


def stray_hits(
    rng: np.random.Generator, m: Muons, event_occupancy: np.ndarray, cfg: SimulationConfig
) -> HitBlock:
    """Noise tubes anywhere in the spectrometer (attached to an event through its first muon)."""
    first = np.unique(m.event, return_index=True)[1]
    count = rng.poisson(cfg.stray_noise_per_event * event_occupancy)
    sel = first[np.repeat(np.arange(len(first)), count)]
    blocks = []
    station_of = rng.integers(0, len(det.STATIONS), len(sel))
    for k, station in enumerate(det.STATIONS):
        s = sel[station_of == k]
        n = len(s)
        sector = rng.integers(0, det.N_SECTORS, n)
        span = station.extent[1] - station.extent[0]
        side = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        tube = np.floor((station.extent[0] + rng.random(n) * span) / det.TUBE_PITCH)
        tube = tube * side if station.barrel else tube
        radius = rng.uniform(0, det.TUBE_RADIUS, n)
        rows = _tube_rows(
            station,
            rng.integers(0, len(det.tube_layer_offsets(station)), n),
            tube,
            sector,
            sector * det.SECTOR_WIDTH,
            sector % 2 == 0,
            side,
            radius,
            rng.uniform(0, 1000, n),
        )
        blocks.append(HitBlock(rows, s, np.zeros(n, bool)))
    return HitBlock(
        np.concatenate([b.rows for b in blocks]),
        np.concatenate([b.muon for b in blocks]),
        np.zeros(len(sel), bool),
    )


# -- events ------------------------------------------------------------------------------------
def _occupancy(
    rng: np.random.Generator, m: Muons, n_events: int, cfg: SimulationConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Noise multipliers per muon and per event: more at high |eta|; broad pile-up for `high`."""
    event = np.full(n_events, cfg.noise_scale)
    if cfg.multiplicity == "high":
        event = event * rng.uniform(1.8, 11.0, n_events)
    return event[m.event] * (1 + 0.5 * np.abs(m.eta) / 2.7), event


def _chunk(rng: np.random.Generator, n_events: int, cfg: SimulationConfig):
    """Simulate `n_events` candidates; return (hits per kept event, tracks per kept event)."""
    m = generate_muons(rng, n_events, cfg)
    occupancy, event_occupancy = _occupancy(rng, m, n_events, cfg)
    blocks = [
        *mdt_hits(rng, m, occupancy, cfg),
        *strip_hits(rng, m, occupancy, cfg),
        stray_hits(rng, m, event_occupancy, cfg),
    ]
    rows = np.concatenate([b.rows for b in blocks])
    muon = np.concatenate([b.muon for b in blocks])
    truth = np.concatenate([b.truth for b in blocks])
    # reference cuts: a muon needs min_hits_per_muon true hits; muons failing it leave no truth hits
    truth_count = np.bincount(muon[truth], minlength=len(m.pt))
    kept_muon = truth_count >= cfg.min_hits_per_muon
    keep_row = ~truth | kept_muon[muon]
    rows, muon, truth = rows[keep_row], muon[keep_row], truth[keep_row]
    # renumber the kept muons 0..n-1 within their event; drop events left without a muon
    rank = np.cumsum(kept_muon) - 1
    kept_per_event = np.bincount(m.event[kept_muon], minlength=n_events)
    event_start = np.concatenate([[0], np.cumsum(kept_per_event)])[:-1]
    link = np.where(truth, rank[muon] - event_start[m.event[muon]], NOISE_LINK)
    rows[:, COL["spacePoint_truthLink"]] = link
    event = m.event[muon]
    kept_event = kept_per_event > 0
    sel = kept_event[event]
    rows, event, truth = rows[sel], event[sel], truth[sel]
    # at most max_hits per event: drop noise beyond the cap (truth first, then noise in random order)
    order = np.lexsort((rng.random(len(event)), ~truth, event))
    rows, event = rows[order], event[order]
    start = np.searchsorted(event, event, side="left")
    keep = np.arange(len(event)) - start < cfg.max_hits
    rows, event = rows[keep], event[keep]
    order = np.lexsort((rng.random(len(event)), event))  # hits in random order within the event
    rows, event = rows[order].astype(np.float32), event[order]
    bounds = np.searchsorted(event, np.nonzero(kept_event)[0], side="left")
    hits = np.split(rows, bounds[1:])
    tracks_all = np.stack([m.pt, m.eta, m.phi, m.q], axis=1).astype(np.float32)
    tracks = [tracks_all[(m.event == e) & kept_muon] for e in np.nonzero(kept_event)[0]]
    return hits, tracks


def simulate_events(
    n_events: int, seed: int, config: SimulationConfig | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Exactly `n_events` events passing the cuts: per event hits [n, 20] and tracks [k, 4] (schema order)."""
    config = config or SimulationConfig()
    return _simulate(np.random.default_rng(seed), n_events, config)


def _simulate(rng: np.random.Generator, n_events: int, cfg: SimulationConfig, bar: tqdm | None = None):
    hits: list[np.ndarray] = []
    tracks: list[np.ndarray] = []
    while len(hits) < n_events:
        need = n_events - len(hits)
        h, t = _chunk(rng, min(CHUNK_EVENTS, int(need * 1.05) + 8), cfg)
        h, t = h[:need], t[:need]
        hits += h
        tracks += t
        if bar is not None:
            bar.update(len(h))
    return hits, tracks


def write_simulated_dataset(
    out_dir: str | Path,
    n_events: int,
    seed: int = 0,
    files: int = 1,
    config: SimulationConfig | None = None,
    compression: str | None = "gzip",
    progress: bool = True,
) -> Path:
    """Simulate and write a dataset in the hepattn layout; same arguments give identical bytes."""
    config = config or SimulationConfig()
    files = max(files, math.ceil(n_events / MAX_EVENTS_PER_FILE))  # bounded memory per file
    rng = np.random.default_rng(seed)
    parameters = {
        "simulator": config.to_dict(),
        "seed": seed,
        "events": n_events,
        "cuts": {
            "min_pt": config.pt_min,
            "max_abs_eta": config.eta_max,
            "min_hits_per_muon": config.min_hits_per_muon,
        },
        "limits": {"max_muons": 2, "max_hits": config.max_hits},
    }
    sizes = [len(part) for part in np.array_split(np.arange(n_events), files)]
    with (
        DatasetWriter(out_dir, processing_parameters=parameters, compression=compression) as writer,
        tqdm(total=n_events, desc="simulating", unit="ev", disable=not progress) as bar,
    ):
        start = 0
        for size in sizes:
            hits, tracks = _simulate(rng, size, config, bar)
            writer.write_file(hits, tracks, list(range(start, start + size)))
            start += size
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="muonreg-simulate",
        description="Simulate muon events into a dataset in the hepattn ATLAS-muon layout.",
    )
    parser.add_argument("--events", type=int, help="number of events (after the reference cuts)")
    parser.add_argument("--out", type=Path, help="output dataset directory (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--files", type=int, default=1, help="number of data/*.h5 files")
    parser.add_argument("--multiplicity", choices=MULTIPLICITIES, default="default")
    parser.add_argument("--noise-scale", type=float, default=1.0)
    parser.add_argument("--pt-spectrum", choices=SPECTRA, default="flat_qpt")
    parser.add_argument("--uncompressed", action="store_true", help="write chunked, uncompressed files")
    parser.add_argument(
        "--default", action="store_true", help="generate the default dataset of conf/ and print its path"
    )
    args = parser.parse_args(argv)
    if args.default:
        from muonreg.data.cache import ensure_default_dataset

        print(ensure_default_dataset())
        return
    if args.events is None or args.out is None:
        parser.error("--events and --out are required (or give --default)")
    config = SimulationConfig(
        multiplicity=args.multiplicity, noise_scale=args.noise_scale, pt_spectrum=args.pt_spectrum
    )
    path = write_simulated_dataset(
        args.out,
        args.events,
        args.seed,
        args.files,
        config,
        compression=None if args.uncompressed else "gzip",
    )
    print(path)


if __name__ == "__main__":
    main()

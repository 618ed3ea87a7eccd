"""Detector simulator: events of 1-2 muons in the ATLAS Muon Spectrometer, in the hepattn layout.

    python -m muonreg.data.simulate --events N --out DIR [--seed S] [--files K] [--multiplicity high]

Physics (DESIGN section 3), on the nominal detector of `muonreg.detector` plus the truths a real
detector adds and no reconstruction knows event by event:
- muons from the beam spot with a configurable pT spectrum; the solenoid turns phi by 0.36 q/pT;
- the calorimeters take a Landau-like energy loss whose most probable value grows with the
  material on the path (|eta|) and slowly with log p, and scatter by ~0.15 rad GeV/p (more
  material, more scattering); the toroid bends in r-z with curvature 0.3 B q/p;
- chambers sit at fixed offsets from their nominal place (misalignment: one set per dataset);
- MDT tubes measure a drift time, turned into a drift radius with the nominal r-t relation and
  its t0; every MDT hit (muon, delta ray or noise) goes through the same relation and smearing,
  noise hits arriving uniformly in time; RPC/TGC strips (95 % efficient, clusters of 1-3 strips)
  measure both coordinates coarsely, with a driftR of 0 as the real preparation writes;
- a tube or strip fires once per event: when two hits share one, the earlier one is kept.
Noise: tubes and strips in the chambers a muon crosses (the real data is hit-filtered around the
muons), delta-ray neighbours of true tube hits, and a few hits elsewhere. `missing_fraction`
blanks measured values (NaN, inf or -999) to exercise missing-value handling.

Everything is vectorised over the muons of a chunk of events; a seed fixes every byte.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from muonreg import detector as det
from muonreg.data.format import DatasetWriter
from muonreg.data.schema import HIT_FEATURES, NOISE_LINK, Technology

COL = {name: i for i, name in enumerate(HIT_FEATURES)}
MULTIPLICITIES = ("default", "high")
SPECTRA = ("flat_qpt", "flat_pt", "falling")
MAX_EVENTS_PER_FILE = 100_000
CHUNK_EVENTS = 2000
# Columns `missing_fraction` may blank, and the values that stand for "not measured".
MISSABLE = [COL[c] for c in HIT_FEATURES[:13]]
MISSING_VALUES = np.array([np.nan, np.inf, -999.0], dtype=np.float32)
# Chamber offsets are drawn for every (station index, sector, side, chamber number along the stack).
ALIGNMENT_SHAPE = (8, det.N_SECTORS, 2, 16)


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
    calo_scattering: float = 0.15  # rad GeV / p at eta 0; grows with the square root of the material
    ms_scattering: float = 0.015  # rad GeV / p per station crossed
    energy_loss_mpv: float = 2.8  # GeV: most probable calorimeter loss at eta 0 and p = 10 GeV
    energy_loss_width: float = 0.2  # GeV: width of its Landau-like tail there
    energy_loss_log_slope: float = 0.07  # relative rise of the loss per unit of ln(p / 10 GeV)
    material_eta_slope: float = 0.25  # material on the path through the calorimeters: 1 + slope |eta|
    alignment: float = det.CHAMBER_ALIGNMENT  # mm: spread of the chamber offsets
    alignment_seed: int | None = None  # the detector's chamber offsets; None: from the dataset seed
    mdt_noise_per_station: float = 6.5  # noise tubes per crossed MDT station (default multiplicity)
    strip_noise_per_station: float = 1.0
    delta_ray_probability: float = 0.04
    stray_noise_per_event: float = 2.0
    missing_fraction: float = 0.0  # share of hits with one measured column missing (NaN, inf or -999)

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
        if not 0 <= self.missing_fraction <= 1:
            raise ValueError(f"missing_fraction={self.missing_fraction} must be in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


class Alignment:
    """Where the chambers really are: fixed offsets along the precision coordinate, one draw per detector."""

    def __init__(self, seed: int, spread: float):
        self.offsets = np.random.default_rng([seed, 0xA1]).normal(0.0, spread, ALIGNMENT_SHAPE)

    def __call__(self, station: int, sector: np.ndarray, side: np.ndarray, chamber: np.ndarray) -> np.ndarray:
        """Offsets (mm) of the chambers holding the given crossings (chamber: 0-based along the stack)."""
        s = (side > 0).astype(np.int64)
        return self.offsets[station, sector, s, np.clip(chamber, 0, ALIGNMENT_SHAPE[3] - 1)]


# -- muons -------------------------------------------------------------------------------------
def _sample_pt(rng: np.random.Generator, n: int, cfg: SimulationConfig) -> np.ndarray:
    u = rng.random(n)
    lo, hi = cfg.pt_min, cfg.pt_max
    if cfg.pt_spectrum == "flat_pt":
        return lo + u * (hi - lo)
    if cfg.pt_spectrum == "flat_qpt":
        return 1.0 / (1.0 / hi + u * (1.0 / lo - 1.0 / hi))
    return 1.0 / np.sqrt(1.0 / lo**2 - u * (1.0 / lo**2 - 1.0 / hi**2))  # dN/dpT ~ pT^-3


def material(eta: np.ndarray, cfg: SimulationConfig) -> np.ndarray:
    """Calorimeter material on a straight path at `eta`, relative to eta 0."""
    return 1.0 + cfg.material_eta_slope * np.abs(eta)


def energy_loss(
    rng: np.random.Generator, p: np.ndarray, eta: np.ndarray, cfg: SimulationConfig
) -> np.ndarray:
    """Energy lost in the calorimeters (GeV): a Moyal (Landau-like) draw around a most probable value
    that grows with the material on the path and with log p (relativistic rise, radiative losses)."""
    rise = 1.0 + cfg.energy_loss_log_slope * np.log(np.maximum(p, 1.0) / 10.0)
    moyal = np.minimum(-np.log(np.maximum(rng.standard_normal(len(p)) ** 2, 1e-300)), 40.0)  # mode 0
    return material(eta, cfg) * rise * (cfg.energy_loss_mpv + cfg.energy_loss_width * moyal)


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

    @property
    def side(self) -> np.ndarray:
        return np.where(self.eta >= 0, 1.0, -1.0)


def generate_muons(rng: np.random.Generator, n_events: int, cfg: SimulationConfig) -> Muons:
    count = 1 + (rng.random(n_events) < cfg.two_muon_fraction)
    event = np.repeat(np.arange(n_events), count)
    n = len(event)
    pt = _sample_pt(rng, n, cfg)
    eta = rng.uniform(-cfg.eta_max, cfg.eta_max, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    q = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    p = pt * np.cosh(eta)
    loss = energy_loss(rng, p, eta, cfg)
    p_ms = np.where(p - loss > 1.5, p - loss, 0.0)
    p_scatter = np.maximum(p_ms, 1.0)
    calo_angle = cfg.calo_scattering * np.sqrt(material(eta, cfg))
    phi_ms = phi - q * det.SOLENOID_PHI_KICK / pt + rng.normal(0, 1, n) * calo_angle / p
    sector, phi_s, large = det.sector_of(phi_ms)
    kinks = {det.CALO_RADIUS: rng.normal(0, 1, n) * calo_angle / p}
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


def _stack_position(along: np.ndarray, length: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(0-based chamber number, signed stationEta, 1-based channel within the chamber) of a tube or
    strip at signed coordinate `along` in a stack of chambers `length` long: unique per position."""
    chamber = np.floor(np.abs(along) / length)
    return chamber, np.where(along < 0, -1.0, 1.0) * (chamber + 1), chamber


def _place(rows, centre, axis_phi, half_length, z, cov, tech, layer, sector, station_eta, index) -> None:
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
    rows[:, COL["spacePoint_layer"]] = layer
    rows[:, COL["spacePoint_stationPhi"]] = sector + 1  # 1..16: large and small sectors apart
    rows[:, COL["spacePoint_stationEta"]] = station_eta
    rows[:, COL["spacePoint_stationIndex"]] = index
    rows[:, COL["spacePoint_technology"]] = int(tech)


def tube_half_length(normal: np.ndarray, large: np.ndarray) -> np.ndarray:
    """Half the length of a tube at distance `normal` from the beam (its chamber's width in phi)."""
    coverage = np.where(large, det.SECTOR_COVERAGE[0], det.SECTOR_COVERAGE[1])
    return np.minimum(coverage * np.tan(det.SECTOR_WIDTH / 2) * normal, det.MAX_TUBE_LENGTH / 2)


def _tube_along(layer: np.ndarray, tube: np.ndarray) -> np.ndarray:
    """Coordinate of a tube's wire along its layer (z in the barrel, radius in the endcap)."""
    return (tube + 0.5 + 0.5 * (layer % 2)) * det.TUBE_PITCH  # hexagonal stagger


def _tube_rows(station: det.Station, layer, tube, sector, phi_s, large, side) -> np.ndarray:
    """MDT hit rows of tube `tube` in tube layer `layer` (drift radius and time still to measure)."""
    base = np.where(large, station.position[0], station.position[1]) + det.tube_layer_offsets(station)[layer]
    along = _tube_along(layer, tube)
    if station.barrel:  # tubes stacked along z, numbered with the sign of z
        normal, z = base, along
    else:  # tubes stacked in radius on the wheel at side * |z|
        normal, z = along, base * side
    _, station_eta, chamber = _stack_position(along, station.chamber_length)
    station_eta = station_eta if station.barrel else side * np.abs(station_eta)
    channel = np.floor((np.abs(along) - chamber * station.chamber_length) / det.TUBE_PITCH) + 1
    half = tube_half_length(normal, large)
    rows = np.full((len(tube), len(HIT_FEATURES)), np.nan)
    _place(
        rows,
        (normal * np.cos(phi_s), normal * np.sin(phi_s)),
        phi_s,
        half,
        z,
        (0.0, (2 * half) ** 2 / 12),  # covXX: the drift radius's, set when it is measured
        Technology.MDT,
        layer + 1,
        sector,
        station_eta,
        station.index,
    )
    rows[:, COL["spacePoint_channel"]] = channel
    return rows


def _measure_drift(
    rng: np.random.Generator, rows: np.ndarray, radius: np.ndarray, arrival: np.ndarray | None = None
) -> None:
    """Time and drift radius of MDT rows, the same way for every hit: the tube records the arrival
    time (default: its calibrated t0, the time of flight from the vertex to the tube) plus the
    drift time of `radius` plus jitter; the drift radius comes from the nominal r-t relation at
    that time minus t0. So muon, delta-ray and noise hits all obey one relation and one smearing."""
    centre = [
        (rows[:, COL[f"spacePoint_globEdgeHigh{c}"]] + rows[:, COL[f"spacePoint_globEdgeLow{c}"]]) / 2
        for c in "XYZ"
    ]
    t0 = det.time_of_flight(*centre)
    start = t0 if arrival is None else arrival
    time = start + det.drift_time(radius) + rng.normal(0.0, det.TIME_RESOLUTION, len(radius))
    drift = det.drift_radius(time - t0)
    rows[:, COL["spacePoint_time"]] = time
    rows[:, COL["spacePoint_driftR"]] = drift
    rows[:, COL["spacePoint_covXX"]] = det.drift_resolution(drift) ** 2


def _noise_radius(rng: np.random.Generator, n: int) -> np.ndarray:
    """Drift radii of hits arriving uniformly in time within the drift window (background, noise)."""
    return det.drift_radius(rng.uniform(0.0, det.MAX_DRIFT_TIME, n))


def _strip_rows(lay: det.TriggerLayer, m: Muons, sel, strip, dphi, time) -> np.ndarray:
    """Strip hits: the bending coordinate from the strip number, phi from the crossing phi strip."""
    base = np.where(m.large[sel], lay.position[0], lay.position[1])
    side = m.side[sel]
    measured = (strip + 0.5) * lay.pitch
    phi_s = m.phi_s[sel]
    if lay.barrel:  # strips numbered along z with its sign
        along = (np.floor(base * np.tan(dphi) / lay.phi_pitch) + 0.5) * lay.phi_pitch
        centre = (base * np.cos(phi_s) - along * np.sin(phi_s), base * np.sin(phi_s) + along * np.cos(phi_s))
        half, z = lay.phi_pitch / 2, measured
        phi_cov = lay.phi_pitch**2 / 12
        chamber_length = 2400.0
    else:  # wire groups measure the radius in the chamber frame, radial strips measure phi
        along = measured * np.tan((np.floor(dphi / lay.phi_pitch) + 0.5) * lay.phi_pitch)
        centre = (
            measured * np.cos(phi_s) - along * np.sin(phi_s),
            measured * np.sin(phi_s) + along * np.cos(phi_s),
        )
        half, z = measured * lay.phi_pitch / 2, base * side
        phi_cov = (measured * lay.phi_pitch) ** 2 / 12
        chamber_length = 2000.0
    _, station_eta, chamber = _stack_position(measured, chamber_length)
    station_eta = station_eta if lay.barrel else side * np.abs(station_eta)
    rows = np.full((len(sel), len(HIT_FEATURES)), np.nan)
    _place(
        rows,
        centre,
        phi_s,
        half,
        z,
        (lay.pitch**2 / 12, phi_cov),
        lay.technology,
        lay.layer,
        m.sector[sel],
        station_eta,
        lay.station_index,
    )
    rows[:, COL["spacePoint_channel"]] = (
        np.floor((np.abs(measured) - chamber * chamber_length) / lay.pitch) + 1
    )
    rows[:, COL["spacePoint_driftR"]] = 0.0  # strips have no drift radius; the real preparation writes 0
    rows[:, COL["spacePoint_time"]] = time
    return rows


def _station_crossings(m: Muons, station: det.Station):
    """Crossings of every tube layer of `station`, arrays [muons, layers]: (ok, coordinate, alpha, path).

    The coordinate is z for the barrel and the sector-frame radius for the endcap; a crossing is
    kept where a chamber is: inside the station's extent and its width in phi.
    """
    dphi = m.phi_ms - m.phi_s
    cos_dphi = np.cos(dphi)
    base = np.where(m.large, station.position[0], station.position[1])[:, None] + det.tube_layer_offsets(
        station
    )
    if station.barrel:
        found, along, alpha, path = det.crossing(m.rho, m.z, m.alpha, base / cos_dphi[:, None])
        normal = base
    else:
        found, along, alpha, path = det.crossing(m.z * m.side[:, None], m.rho, m.alpha, base)
        along = along * cos_dphi[:, None]
        normal = along
    covered = (np.abs(along) >= station.extent[0]) & (np.abs(along) <= station.extent[1])
    in_phi = np.abs(normal * np.tan(dphi)[:, None]) <= tube_half_length(normal, m.large[:, None])
    ok = found & covered & in_phi & (m.p_ms[:, None] > 0)
    return ok, along, alpha, path


def mdt_hits(
    rng: np.random.Generator, m: Muons, occupancy: np.ndarray, alignment: Alignment, cfg: SimulationConfig
) -> list[HitBlock]:
    """True tube hits, delta-ray neighbours, and noise tubes in every MDT chamber a muon crosses."""
    blocks = []
    for station in det.STATIONS:
        ok, along, alpha, path = _station_crossings(m, station)
        mu, layer = np.nonzero(ok)
        if len(mu) == 0:
            continue
        side = m.side[mu]
        chamber, _, _ = _stack_position(along[mu, layer], station.chamber_length)
        # the chamber sits at an offset from its nominal place, which the tube numbering assumes
        coord = along[mu, layer] + alignment(station.index, m.sector[mu], side, chamber.astype(np.int64))
        # inclination to the layer plane: how far the track passes from the neighbouring wires
        incline = np.abs(np.cos(alpha[mu, layer])) if station.barrel else np.abs(np.sin(alpha[mu, layer]))
        stagger = 0.5 + 0.5 * (layer % 2)
        nearest = np.floor(coord / det.TUBE_PITCH - stagger + 0.5)
        tof = path[mu, layer] * det.STEP / det.C_MM_PER_NS  # the muon's arrival at the layer
        args = (m.sector[mu], m.phi_s[mu], m.large[mu], side)
        for delta in (-1, 0, 1):
            tube = nearest + delta
            dist = np.abs(coord - (tube + stagger) * det.TUBE_PITCH) * incline
            i = np.nonzero(
                (dist < det.TUBE_RADIUS)
                & (station.barrel | (tube >= 0))
                & (rng.random(len(mu)) < cfg.mdt_efficiency)
            )[0]
            rows = _tube_rows(station, layer[i], tube[i], *(a[i] for a in args))
            _measure_drift(rng, rows, dist[i], tof[i])
            blocks.append(HitBlock(rows, mu[i], np.ones(len(i), bool)))
            # a delta electron lights up a neighbouring tube: noise right next to a true hit
            j = i[rng.random(len(i)) < cfg.delta_ray_probability * cfg.noise_scale]
            neighbour = tube[j] + np.where(rng.random(len(j)) < 0.5, -1, 1)
            neighbour = neighbour if station.barrel else np.abs(neighbour)
            rows = _tube_rows(station, layer[j], neighbour, *(a[j] for a in args))
            _measure_drift(rng, rows, rng.uniform(0, det.TUBE_RADIUS, len(j)), tof[j])
            blocks.append(HitBlock(rows, mu[j], np.zeros(len(j), bool)))
        # uncorrelated noise tubes in the chamber the muon crosses
        first = np.unique(mu, return_index=True)[1]
        crossed, centre = mu[first], nearest[first]
        count = rng.poisson(cfg.mdt_noise_per_station * occupancy[crossed])
        who = np.repeat(np.arange(len(crossed)), count)
        sel = crossed[who]
        n_layers = len(det.tube_layer_offsets(station))
        tube = centre[who] + rng.integers(-20, 21, len(who))
        tube = tube if station.barrel else np.abs(tube)
        rows = _tube_rows(
            station,
            rng.integers(0, n_layers, len(who)),
            tube,
            m.sector[sel],
            m.phi_s[sel],
            m.large[sel],
            m.side[sel],
        )
        _measure_drift(rng, rows, _noise_radius(rng, len(who)))
        blocks.append(HitBlock(rows, sel, np.zeros(len(who), bool)))
    return blocks


def strip_hits(
    rng: np.random.Generator, m: Muons, occupancy: np.ndarray, cfg: SimulationConfig
) -> list[HitBlock]:
    """RPC/TGC hits (clusters of 1-3 strips, 70/25/5 %) and noise strips in crossed chambers."""
    blocks = []
    cos_dphi = np.cos(m.phi_ms - m.phi_s)
    dphi = m.phi_ms - m.phi_s
    for lay in det.TRIGGER_LAYERS:
        base = np.where(m.large, lay.position[0], lay.position[1])
        if lay.barrel:
            found, z, _, path = det.crossing(m.rho, m.z, m.alpha, base / cos_dphi)
            coord, rho = z, base / cos_dphi
        else:
            found, rho, _, path = det.crossing(m.z * m.side[:, None], m.rho, m.alpha, base)
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
        time = tof[sel] + rng.uniform(-25, 25, len(sel))  # anywhere in the trigger's read-out window
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
        rows = _tube_rows(
            station,
            rng.integers(0, len(det.tube_layer_offsets(station)), n),
            tube,
            sector,
            sector * det.SECTOR_WIDTH,
            sector % 2 == 0,
            side,
        )
        _measure_drift(rng, rows, _noise_radius(rng, n))
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


def readout_id(rows: np.ndarray, event: np.ndarray) -> np.ndarray:
    """One integer per (event, technology, station index/eta/phi, layer, channel): a tube or strip."""
    key = event.astype(np.int64)
    for name, size, shift in (
        ("technology", 8, 0),
        ("stationIndex", 8, 0),
        ("stationEta", 64, 32),
        ("stationPhi", 32, 0),
        ("layer", 16, 0),
        ("channel", 1024, 0),
    ):
        key = key * size + (rows[:, COL[f"spacePoint_{name}"]].astype(np.int64) + shift)
    return key


def _first_per_readout(rows: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Indices of the hits to keep: one per tube or strip and event, the earliest one."""
    order = np.lexsort((rows[:, COL["spacePoint_time"]], readout_id(rows, event)))
    ids = readout_id(rows[order], event[order])
    first = np.ones(len(ids), bool)
    first[1:] = ids[1:] != ids[:-1]
    return np.sort(order[first])


def _blank_values(rng: np.random.Generator, rows: np.ndarray, fraction: float) -> None:
    """Replace one measured value of `fraction` of the hits by NaN, inf or -999 (in place)."""
    hit = np.nonzero(rng.random(len(rows)) < fraction)[0]
    column = rng.choice(MISSABLE, len(hit))
    rows[hit, column] = rng.choice(MISSING_VALUES, len(hit))


def _chunk(rng: np.random.Generator, n_events: int, cfg: SimulationConfig, alignment: Alignment):
    """Simulate `n_events` candidates; return (hits per kept event, tracks per kept event)."""
    m = generate_muons(rng, n_events, cfg)
    occupancy, event_occupancy = _occupancy(rng, m, n_events, cfg)
    blocks = [
        *mdt_hits(rng, m, occupancy, alignment, cfg),
        *strip_hits(rng, m, occupancy, cfg),
        stray_hits(rng, m, event_occupancy, cfg),
    ]
    rows = np.concatenate([b.rows for b in blocks])
    muon = np.concatenate([b.muon for b in blocks])
    truth = np.concatenate([b.truth for b in blocks])
    keep = _first_per_readout(rows, m.event[muon])  # a tube or strip fires once per event
    rows, muon, truth = rows[keep], muon[keep], truth[keep]
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
    if cfg.missing_fraction:
        _blank_values(rng, rows, cfg.missing_fraction)
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
    return _simulate(np.random.default_rng(seed), n_events, config, detector_alignment(seed, config))


def detector_alignment(seed: int, config: SimulationConfig) -> Alignment:
    """The chamber offsets of the detector a dataset of this seed and config is taken with."""
    return Alignment(seed if config.alignment_seed is None else config.alignment_seed, config.alignment)


def _simulate(
    rng: np.random.Generator,
    n_events: int,
    cfg: SimulationConfig,
    alignment: Alignment,
    bar: tqdm | None = None,
):
    hits: list[np.ndarray] = []
    tracks: list[np.ndarray] = []
    while len(hits) < n_events:
        need = n_events - len(hits)
        h, t = _chunk(rng, min(CHUNK_EVENTS, int(need * 1.05) + 8), cfg, alignment)
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
    from muonreg.versions import SIMULATOR_VERSION

    config = config or SimulationConfig()
    files = max(files, math.ceil(n_events / MAX_EVENTS_PER_FILE))  # bounded memory per file
    rng = np.random.default_rng(seed)
    alignment = detector_alignment(seed, config)
    parameters = {
        "simulator": config.to_dict(),
        "simulator_version": SIMULATOR_VERSION,
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
            hits, tracks = _simulate(rng, size, config, alignment, bar)
            writer.write_file(hits, tracks, list(range(start, start + size)))
            start += size
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="muonreg-simulate",
        description="Simulate muon events into a dataset in the hepattn ATLAS-muon layout. "
        "(The dataset `python train.py` uses by default: python -m muonreg.prepare default.)",
    )
    parser.add_argument(
        "--events", type=int, required=True, help="number of events (after the reference cuts)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output dataset directory (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--files", type=int, default=1, help="number of data/*.h5 files")
    parser.add_argument("--multiplicity", choices=MULTIPLICITIES, default="default")
    parser.add_argument("--noise-scale", type=float, default=1.0)
    parser.add_argument("--pt-spectrum", choices=SPECTRA, default="flat_qpt")
    parser.add_argument(
        "--missing-fraction",
        type=float,
        default=0.0,
        help="share of hits with a value blanked (NaN/inf/-999)",
    )
    parser.add_argument("--uncompressed", action="store_true", help="write chunked, uncompressed files")
    args = parser.parse_args(argv)
    config = SimulationConfig(
        multiplicity=args.multiplicity,
        noise_scale=args.noise_scale,
        pt_spectrum=args.pt_spectrum,
        missing_fraction=args.missing_fraction,
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

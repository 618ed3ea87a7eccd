"""The nominal ATLAS Muon Spectrometer: stations, trigger chambers, toroid field, drift relation.

What a real experiment knows of its detector by design and calibration, shared by the simulator
(which makes hits with it, plus the truths it adds: misalignment, material, noise) and the
reconstruction (which may use this and nothing else). Lengths in mm, field in T, momenta in GeV.

Tracks are propagated in their own plane of constant phi: `rho` is the transverse distance from
the beam line along that direction and `z` the beam coordinate. The toroid field points along
phi, so it bends tracks inside that plane; the solenoid's bending in phi is applied before the
spectrometer as a rotation (`SOLENOID_PHI_KICK`). Chambers are planes: a barrel chamber at normal
distance R from the beam in sector direction phi_s is met at rho = R / cos(phi - phi_s).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from muonreg.data.schema import Technology

C_MM_PER_NS = 299.792458
N_SECTORS = 16
SECTOR_WIDTH = 2 * np.pi / N_SECTORS
TUBE_RADIUS = 14.6
TUBE_PITCH = 30.035
TUBE_LAYER_STEP = 26.0  # hexagonal packing of tube layers
CHAMBER_ALIGNMENT = 0.1  # mm: spread of the chamber offsets along the precision coordinate
SOLENOID_PHI_KICK = 0.36  # rad GeV: phi at the spectrometer = phi0 - q * 0.36 / pT
MAX_DRIFT_TIME = 750.0  # ns
DRIFT_LINEAR = 0.4  # share of the linear term of the r-t relation (fast drift near the wire)
TIME_RESOLUTION = 4.0  # ns: 0.2 mm near the wire, ~80 um at mid radius, 50 um at the tube wall
STEP = 50.0  # propagation step along the path
MAX_PATH = 26000.0  # reaches the outer endcap wheel at |eta| 1.1 and beyond
CALO_RADIUS = 3000.0  # distance from the vertex at which the calorimeter scattering/energy loss is applied
# Nominal material, as a reconstruction knows it: the calorimeters' multiple-scattering angle
# (rad GeV / p) and the spread of their energy loss (GeV).
CALO_SCATTERING = 0.15
ENERGY_LOSS_SPREAD = 0.3
# Chamber widths in phi, as a fraction of the sector pitch (large, small sectors: together about the
# whole circle), and the longest tube: long outer-endcap chambers are cut, as real ones are.
SECTOR_COVERAGE = (1.0, 1.0)
MAX_TUBE_LENGTH = 3940.0
# Barrel-endcap transition: the two toroids' fields partly cancel, so the bending power dips at
# 1.3 < |eta| < 1.6 (to ~1 T m against 3-6 T m elsewhere)
TRANSITION_ETA = 1.45
TRANSITION_WIDTH = 0.09
TRANSITION_DEPTH = 0.75


@dataclass(frozen=True)
class Station:
    """An MDT station: planar chambers (barrel: at radius R per sector kind; endcap: at |z|)."""

    name: str
    index: int  # spacePoint_stationIndex code
    barrel: bool
    position: tuple[float, float]  # (large, small) sectors: R (barrel) or |z| (endcap)
    extent: tuple[float, float]  # covered |z| (barrel) or rho (endcap) range
    tube_layers: int  # per multilayer; two multilayers per chamber
    spacing: float  # distance between the two multilayers
    chamber_length: float  # along z (barrel) or rho (endcap), for stationEta


STATIONS = (
    Station("BI", 0, True, (4950.0, 4450.0), (0.0, 7000.0), 4, 170.0, 1800.0),
    Station("BM", 1, True, (7100.0, 8000.0), (0.0, 9600.0), 3, 317.0, 2400.0),
    Station("BO", 2, True, (9500.0, 10500.0), (0.0, 12500.0), 3, 317.0, 2400.0),
    Station("EI", 4, False, (7400.0, 7800.0), (1000.0, 6800.0), 4, 170.0, 1500.0),
    Station("EE", 7, False, (10800.0, 11200.0), (7000.0, 10500.0), 3, 317.0, 1750.0),
    Station("EM", 5, False, (14000.0, 13600.0), (1600.0, 12000.0), 3, 317.0, 2000.0),
    Station("EO", 6, False, (21500.0, 21100.0), (2000.0, 12000.0), 3, 317.0, 2000.0),
)


def tube_layer_offsets(station: Station) -> np.ndarray:
    """Offsets of the tube-layer centres from the chamber centre, inner multilayer first."""
    one = np.arange(station.tube_layers) * TUBE_LAYER_STEP
    half = station.spacing / 2 + (station.tube_layers - 1) * TUBE_LAYER_STEP
    return np.concatenate([-half + one, station.spacing / 2 + one])


@dataclass(frozen=True)
class TriggerLayer:
    """One gas gap of an RPC (barrel) or TGC (endcap) chamber; a hit is a small strip crossing."""

    technology: Technology
    barrel: bool
    position: tuple[float, float]  # (large, small): R (barrel) or |z| (endcap)
    station_index: int
    layer: int
    pitch: float  # bending-coordinate strip pitch (z for RPC, rho for TGC), mm
    phi_pitch: float  # mm along the strip for RPC; rad for TGC
    time_resolution: float  # ns
    eta_range: tuple[float, float]


def _rpc(r_large: float, r_small: float, station: int, layer: int) -> TriggerLayer:
    return TriggerLayer(
        Technology.RPC, True, (r_large, r_small), station, layer, 30.0, 30.0, 1.0, (0.0, 1.05)
    )


def _tgc(z_large: float, station: int, layer: int) -> TriggerLayer:
    return TriggerLayer(
        Technology.TGC, False, (z_large, z_large - 60.0), station, layer, 15.0, 0.003, 4.0, (1.05, 2.4)
    )


TRIGGER_LAYERS = (
    # RPC: two doublets around BM, one outside BO (6 gas gaps)
    _rpc(6800.0, 7700.0, 1, 1),
    _rpc(6820.0, 7720.0, 1, 2),
    _rpc(7450.0, 8350.0, 1, 3),
    _rpc(7470.0, 8370.0, 1, 4),
    _rpc(9850.0, 10850.0, 2, 5),
    _rpc(9870.0, 10870.0, 2, 6),
    # TGC: a doublet at the inner wheel, the triplet M1 and the doublets M2, M3 at the middle wheel
    _tgc(7000.0, 4, 1),
    _tgc(7020.0, 4, 2),
    _tgc(13400.0, 5, 3),
    _tgc(13420.0, 5, 4),
    _tgc(13440.0, 5, 5),
    _tgc(14700.0, 5, 6),
    _tgc(14720.0, 5, 7),
    _tgc(15100.0, 5, 8),
    _tgc(15120.0, 5, 9),
)


def toroid_field(rho: np.ndarray, z: np.ndarray) -> np.ndarray:
    """B along phi (T): an ideal 1/r toroid in the barrel (3.9 T m / r, about 0.5 T) and the endcaps
    (3 T m / r capped at 2 T near the beam: about 1 T), weakened where the two overlap."""

    az = np.abs(z)
    barrel = (rho > 4800.0) & (rho < 10200.0) & (az < 12500.0)
    endcap = ~barrel & (rho > 800.0) & (rho < 5350.0) & (az > 7900.0) & (az < 10900.0)
    safe = np.maximum(rho, 1.0)
    field = np.where(barrel, 3900.0 / safe, np.where(endcap, np.minimum(3000.0 / safe, 2.0), 0.0))
    eta = np.arcsinh(az / safe)
    return field * (1 - TRANSITION_DEPTH * np.exp(-0.5 * ((eta - TRANSITION_ETA) / TRANSITION_WIDTH) ** 2))


def field_integral(eta: float | np.ndarray, step: float = 10.0) -> np.ndarray:
    """Bending power: the integral of B along a straight line from the vertex at `eta` (T m)."""
    eta = np.atleast_1d(np.asarray(eta, dtype=float))
    s = np.arange(0.0, MAX_PATH, step)
    lam = np.arctan(np.sinh(eta))[:, None]
    return toroid_field(s * np.cos(lam), s * np.sin(lam)).sum(-1) * step * 1e-3


def drift_time(radius: np.ndarray) -> np.ndarray:
    """The r-t relation: drift time (ns) from a drift radius (mm), fast near the wire, slow at the wall."""
    x = np.clip(radius, 0.0, TUBE_RADIUS) / TUBE_RADIUS
    return MAX_DRIFT_TIME * (DRIFT_LINEAR * x + (1 - DRIFT_LINEAR) * x**2)


def drift_radius(time: np.ndarray) -> np.ndarray:
    """The inverse r-t relation: drift radius (mm) from a drift time (ns), clipped to the tube."""
    u = np.clip(time, 0.0, MAX_DRIFT_TIME) / MAX_DRIFT_TIME
    a = DRIFT_LINEAR
    return TUBE_RADIUS * (np.sqrt(a * a + 4 * (1 - a) * u) - a) / (2 * (1 - a))


def drift_resolution(radius: np.ndarray) -> np.ndarray:
    """Drift-radius resolution (mm): the time resolution over the local drift speed dt/dr."""
    x = np.clip(radius, 0.0, TUBE_RADIUS) / TUBE_RADIUS
    speed = MAX_DRIFT_TIME * (DRIFT_LINEAR + 2 * (1 - DRIFT_LINEAR) * x) / TUBE_RADIUS  # ns per mm
    return TIME_RESOLUTION / speed


def time_of_flight(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """ns from the vertex to a point on a straight line: the t0 a chamber is calibrated with."""
    return np.sqrt(x * x + y * y + z * z) / C_MM_PER_NS


def sector_of(phi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sector 0..15, its centre phi, is-large) for directions phi; even sectors are the large ones."""
    sector = np.round(np.asarray(phi) / SECTOR_WIDTH).astype(np.int64) % N_SECTORS
    return sector, sector * SECTOR_WIDTH, sector % 2 == 0


def propagate(
    rho0: np.ndarray,
    z0: np.ndarray,
    alpha0: np.ndarray,
    q_over_p: np.ndarray,
    kinks: dict[float, np.ndarray] | None = None,
    n_steps: int = int(MAX_PATH / STEP),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trajectories in the (rho, z) plane: arrays [tracks, n_steps + 1] of rho, z, direction angle.

    alpha is the direction's angle from the rho axis; in the toroid it turns at 0.3 B q/p per m
    (positive charges towards +z). `kinks` maps a path length from the start to extra angles
    [tracks] added there (multiple scattering in material).
    """
    rho = np.empty((len(rho0), n_steps + 1))
    z, alpha = np.empty_like(rho), np.empty_like(rho)
    rho[:, 0], z[:, 0], alpha[:, 0] = rho0, z0, alpha0
    kink_steps = {round(s / STEP): angle for s, angle in (kinks or {}).items()}
    a = np.asarray(alpha0, dtype=float).copy()
    for k in range(n_steps):
        if k in kink_steps:
            a = a + kink_steps[k]
        turn = 0.3e-3 * toroid_field(rho[:, k], z[:, k]) * q_over_p * STEP
        mid = a + turn / 2
        rho[:, k + 1] = rho[:, k] + STEP * np.cos(mid)
        z[:, k + 1] = z[:, k] + STEP * np.sin(mid)
        a = a + turn
        alpha[:, k + 1] = a
    return rho, z, alpha


def crossing(
    coordinate: np.ndarray, other: np.ndarray, alpha: np.ndarray, value: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where each trajectory first reaches `coordinate == value` (coordinate increasing along it).

    coordinate, other, alpha: [tracks, steps]; value: [tracks] (or [tracks, k] for k surfaces).
    Returns (found, other at the crossing, alpha there, path step index as a float).
    """
    value = np.asarray(value, dtype=float)
    squeeze = value.ndim == 1
    value = value.reshape(len(coordinate), -1)
    before = (coordinate[:, None, :] < value[:, :, None]).sum(-1)  # points before the crossing
    found = (before > 0) & (before < coordinate.shape[1])
    i1 = np.clip(before, 1, coordinate.shape[1] - 1)
    i0 = i1 - 1
    rows = np.arange(len(coordinate))[:, None]
    c0, c1 = coordinate[rows, i0], coordinate[rows, i1]
    f = np.clip((value - c0) / np.where(c1 > c0, c1 - c0, 1.0), 0.0, 1.0)
    o = other[rows, i0] + f * (other[rows, i1] - other[rows, i0])
    a = alpha[rows, i0] + f * (alpha[rows, i1] - alpha[rows, i0])
    s = i0 + f
    out = (found, o, a, s)
    return tuple(x[:, 0] for x in out) if squeeze else out


def deflection_table(
    angles: int = 256, points: int = 540, length: float = 27.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """How the field bends a track leaving the vertex along a straight line, per unit q/p.

    For a line at angle lambda from the beam-transverse axis (in a track's r-z plane) and a path
    length t (m) along it: `deflection` = 0.3 * double integral of B (m per GeV^-1), the sideways
    displacement of a track of q/p = 1/GeV in the small-angle limit, and `turn` = 0.3 * integral of B
    (rad per GeV^-1), its change of direction. Returns (lambda grid [angles] over [0, pi/2],
    t grid [points] over [0, length], deflection [angles, points], turn [angles, points]).
    """
    lam = np.linspace(0.0, np.pi / 2, angles)
    t = np.linspace(0.0, length, points)
    step = t[1] - t[0]
    field = toroid_field(1e3 * t[None, :] * np.cos(lam[:, None]), 1e3 * t[None, :] * np.sin(lam[:, None]))
    # trapezoid cumulative integrals along each line
    turn = (
        0.3
        * np.concatenate([np.zeros((angles, 1)), np.cumsum((field[:, 1:] + field[:, :-1]) / 2, 1)], 1)
        * step
    )
    deflection = (
        np.concatenate([np.zeros((angles, 1)), np.cumsum((turn[:, 1:] + turn[:, :-1]) / 2, 1)], 1) * step
    )
    return lam, t, deflection, turn

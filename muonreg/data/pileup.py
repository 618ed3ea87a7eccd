"""HL-LHC pile-up background: the thousands of hits per event a hit filter must remove.

At <mu> = 200 collisions per bunch crossing the spectrometer is filled by hits that belong to no
muon of interest (cavern background of neutrons and photons, soft particles). They are
uncorrelated with the event's muons, so they are made here as hits on random tubes and strips,
through the simulator's own read-out: an MDT background hit arrives at a uniform time in the
drift window and goes through the same r(t) relation, time smearing and covariance as every
other MDT hit (`simulate._tube_rows`, `_measure_drift`, `_noise_radius`); a strip hit is an RPC
or TGC strip (`simulate._strip_rows`) at a time within the trigger read-out window. All carry
truthLink -1. One hit per tube or strip is applied afterwards, with the muon hits.

Occupancy is uniform per tube and per strip, doubled in the inner stations (BI, EI), which see
the most cavern background. The rate is calibrated on the reference: the hit-filter evaluation
of hepattn's ATLAS-muon experiment (jonathanrenusch/hepattn_muon, EVALUATION_SUMMARY.md) counts
725 835 hits in 100 PU200 events before the filter, 7 258 per event, 99.3 % of them not on a
muon. `HITS_PER_MU` makes `muonreg-simulate --format root --pileup 200` give that mean (about
7 260 hits per event, measured in tests/test_root_pipeline.py); it scales linearly with mu.

`simulate_dump` makes the events of a hit dump (the simulator's muons and the noise near them,
with no hit cap, plus this background); `write_pileup_dataset` writes them straight into the
filter dataset that `muonreg-prepare root` makes of the same events written as ROOT files, through
the same reference cuts (`muonreg.data.cuts`), block by block, without the ROOT round trip.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from muonreg import detector as det
from muonreg.data.cuts import Counts, Cuts, Events, apply_cuts
from muonreg.data.format import DatasetWriter
from muonreg.data.schema import HIT_FEATURES, TRACK_FEATURES
from muonreg.data.simulate import (
    SimulationConfig,
    _first_per_readout,
    _measure_drift,
    _noise_radius,
    _strip_rows,
    _tube_rows,
    simulate_events,
)

REFERENCE_HITS_PER_EVENT_PU200 = 7258  # 725 835 hits / 100 events, before the hit filter
HITS_PER_MU = 36.1  # background hits per event per unit of mu, calibrated to the number above
STRIP_SHARE = 0.2  # share of the background on RPC/TGC strips, the rest on MDT tubes
INNER_STATIONS = {"BI", "EI"}
INNER_WEIGHT = 2.0
TRIGGER_WINDOW = 25.0  # ns either side of the time of flight
NO_HIT_LIMIT = np.iinfo(np.int16).max  # the layout's num_hits is int16
EVENTS_PER_BLOCK = 500  # events simulated and written together: ~0.6 GB of rows at pile-up 200


def _tube_weights() -> np.ndarray:
    """Probability that a background tube hit is in each MDT station: its number of tubes
    (layers x covered length), doubled for the inner stations."""
    weights = np.array(
        [
            len(det.tube_layer_offsets(s))
            * (s.extent[1] - s.extent[0])
            * (INNER_WEIGHT if s.name in INNER_STATIONS else 1.0)
            for s in det.STATIONS
        ]
    )
    return weights / weights.sum()


def _strip_range(layer: det.TriggerLayer) -> tuple[float, float]:
    """Range of the strip coordinate a trigger layer covers: |z| on an RPC plane at radius R,
    the radius on a TGC wheel at |z|, from the layer's |eta| range."""
    base = layer.position[0]
    eta_lo, eta_hi = layer.eta_range
    if layer.barrel:
        return 0.0, base * np.sinh(eta_hi)
    return base / np.sinh(eta_hi), base / np.sinh(eta_lo)


def _strip_weights() -> np.ndarray:
    """Probability that a background strip hit is on each trigger layer: its number of strips."""
    ranges = np.array([_strip_range(layer) for layer in det.TRIGGER_LAYERS])
    pitches = np.array([layer.pitch for layer in det.TRIGGER_LAYERS])
    weights = (ranges[:, 1] - ranges[:, 0]) / pitches
    return weights / weights.sum()


def _random_sectors(rng: np.random.Generator, n: int) -> SimpleNamespace:
    """Sector, its centre phi, large/small and detector side of `n` random chambers."""
    sector = rng.integers(0, det.N_SECTORS, n)
    side = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return SimpleNamespace(sector=sector, phi_s=sector * det.SECTOR_WIDTH, large=sector % 2 == 0, side=side)


def _tube_hits(rng: np.random.Generator, n: int) -> np.ndarray:
    station_of = rng.choice(len(det.STATIONS), n, p=_tube_weights())
    rows = np.empty((n, len(HIT_FEATURES)))
    for k, station in enumerate(det.STATIONS):
        sel = np.flatnonzero(station_of == k)
        where = _random_sectors(rng, len(sel))
        span = station.extent[1] - station.extent[0]
        tube = np.floor((station.extent[0] + rng.random(len(sel)) * span) / det.TUBE_PITCH)
        tube = tube * where.side if station.barrel else tube
        layer = rng.integers(0, len(det.tube_layer_offsets(station)), len(sel))
        part = _tube_rows(station, layer, tube, where.sector, where.phi_s, where.large, where.side)
        _measure_drift(rng, part, _noise_radius(rng, len(sel)))
        rows[sel] = part
    return rows


def _strip_hits(rng: np.random.Generator, n: int) -> np.ndarray:
    layer_of = rng.choice(len(det.TRIGGER_LAYERS), n, p=_strip_weights())
    rows = np.empty((n, len(HIT_FEATURES)))
    for k, layer in enumerate(det.TRIGGER_LAYERS):
        sel = np.flatnonzero(layer_of == k)
        where = _random_sectors(rng, len(sel))
        low, high = _strip_range(layer)
        coordinate = rng.uniform(low, high, len(sel))
        strip = np.floor(coordinate / layer.pitch) * (where.side if layer.barrel else 1.0)
        dphi = rng.uniform(-det.SECTOR_WIDTH / 2, det.SECTOR_WIDTH / 2, len(sel))
        flight = np.hypot(layer.position[0], coordinate) / det.C_MM_PER_NS
        time = flight + rng.uniform(-TRIGGER_WINDOW, TRIGGER_WINDOW, len(sel))
        rows[sel] = _strip_rows(layer, where, np.arange(len(sel)), strip, dphi, time)
    return rows


def background_hits(rng: np.random.Generator, n_events: int, mu: float) -> tuple[np.ndarray, np.ndarray]:
    """Pile-up hits of `n_events` events at <mu> = `mu`: (rows [n, 20] in HIT_FEATURES order, event
    index [n]), truthLink -1; Poisson counts with mean `mu * HITS_PER_MU` per event."""
    if mu < 0:
        raise ValueError(f"pile-up mu={mu} must be >= 0")
    event = np.repeat(np.arange(n_events), rng.poisson(mu * HITS_PER_MU, n_events))
    strip = rng.random(len(event)) < STRIP_SHARE
    rows = np.empty((len(event), len(HIT_FEATURES)))
    rows[~strip] = _tube_hits(rng, int((~strip).sum()))
    rows[strip] = _strip_hits(rng, int(strip.sum()))
    rows[:, HIT_FEATURES.index("spacePoint_truthLink")] = -1
    return rows, event


def dump_config(config: SimulationConfig | None = None) -> SimulationConfig:
    """The simulator settings of a pre-filter dump: no hit cap, muons with one hit kept."""
    return dataclasses.replace(config or SimulationConfig(), max_hits=NO_HIT_LIMIT, min_hits_per_muon=1)


def simulate_dump(
    n_events: int, seed: int, pileup: float = 0.0, config: SimulationConfig | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`n_events` events with muons, as per-event hits [n, 20] and tracks [k, 4] (schema order)."""
    config = dump_config(config)
    hits, tracks = simulate_events(n_events, seed, config)
    rng = np.random.default_rng([seed, 0xB6])
    rows, event = background_hits(rng, n_events, pileup)
    rows = np.concatenate([*hits, rows.astype(np.float32)])
    event = np.concatenate([np.repeat(np.arange(n_events), [len(h) for h in hits]), event])
    keep = _first_per_readout(rows, event)  # one hit per tube or strip, muon or background
    rows, event = rows[keep], event[keep]
    order = np.lexsort((rng.random(len(event)), event))
    rows, event = rows[order], event[order]
    return np.split(rows, np.searchsorted(event, np.arange(1, n_events))), tracks


def dump_blocks(n_events: int, seed: int, files: int) -> list[tuple[int, int, int]]:
    """(block seed, first event number, events) of the `files` blocks a dump of `n_events` is
    simulated in, each with its own seed (the ROOT writer's files are these blocks)."""
    sizes = [len(part) for part in np.array_split(np.arange(n_events), files)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [(seed * 10_000 + k, int(starts[k]), sizes[k]) for k in range(files)]


def detector_config(seed: int, config: SimulationConfig | None = None) -> SimulationConfig:
    """One detector (chamber alignment) for every block of a dump: the config's, else the seed's."""
    config = config or SimulationConfig()
    return config if config.alignment_seed is not None else dataclasses.replace(config, alignment_seed=seed)


def pileup_blocks(
    n_events: int,
    seed: int,
    files: int,
    pileup: float,
    config: SimulationConfig | None = None,
    cuts: Cuts | None = None,
) -> Iterator[tuple[Events, np.ndarray, Counts]]:
    """The events of a pile-up dump that pass the reference cuts, block by block (at least `files`
    blocks, at most EVENTS_PER_BLOCK events each), with their event numbers and what the cuts did."""
    config, cuts = detector_config(seed, config), cuts or Cuts()
    for block_seed, first, size in dump_blocks(
        n_events, seed, max(files, math.ceil(n_events / EVENTS_PER_BLOCK))
    ):
        hits, tracks = simulate_dump(size, block_seed, pileup, config)
        events, counts = apply_cuts(
            np.concatenate(hits),
            np.array([len(h) for h in hits]),
            np.concatenate(tracks),
            np.array([len(t) for t in tracks]),
            cuts,
        )
        yield events, first + events.kept, counts


def pileup_parameters(
    n_events: int, seed: int, pileup: float, config: SimulationConfig | None = None, cuts: Cuts | None = None
) -> dict:
    """What a pile-up dataset's metadata.yaml records of how it was made."""
    from muonreg.versions import SIMULATOR_VERSION

    return {
        **dataclasses.asdict(cuts or Cuts()),
        "simulator": dump_config(detector_config(seed, config)).to_dict(),
        "simulator_version": SIMULATOR_VERSION,
        "seed": seed,
        "events": n_events,
        "pileup": pileup,
    }


def write_pileup_dataset(
    out_dir: str | Path,
    n_events: int,
    seed: int = 0,
    files: int = 1,
    pileup: float = 200.0,
    config: SimulationConfig | None = None,
    cuts: Cuts | None = None,
    compression: str | None = "gzip",
    progress: bool = True,
) -> Path:
    """Simulate `n_events` events at pile-up `pileup` and write those passing the reference cuts as a
    filter dataset (no hit limit) of `files` data files or more (at most EVENTS_PER_BLOCK events
    each); same arguments give identical bytes, and the same events as `muonreg-simulate --format
    root` with these arguments (and as many files) prepared by `muonreg-prepare root`."""
    total = Counts()
    with (
        DatasetWriter(
            out_dir,
            hit_features=HIT_FEATURES,
            track_features=TRACK_FEATURES,
            processing_parameters=pileup_parameters(n_events, seed, pileup, config, cuts),
            compression=compression,
        ) as writer,
        tqdm(total=n_events, desc=f"simulating (pile-up {pileup:g})", unit="ev", disable=not progress) as bar,
    ):
        for events, numbers, counts in pileup_blocks(n_events, seed, files, pileup, config, cuts):
            total.add(counts)
            if counts.events_kept:
                writer.write_file(events.hits, events.tracks, numbers.tolist())
            bar.update(counts.events_seen)
        writer.processing_summary = dataclasses.asdict(total)
    return Path(out_dir)

"""Simulated events as ATLAS hit-dump ROOT files, with HL-LHC pile-up: input for `muonreg-prepare root`.

    muonreg-simulate --format root --events N --out DIR [--files K] [--seed S] [--pileup MU]

Writes DIR/simulated_<k>.root, each one `MuonHitDump` tree in the dump's branch structure
(`root_layout`). The events are the simulator's (`simulate.simulate_events`: muons, their hits,
delta rays and the noise near them) before the filtered-set limits: no hit cap, and muons with a
single hit are kept so that the preparation's minimum-hits cut has work to do. `--pileup MU` adds
the background of `pileup.background_hits` (about 7 260 hits per event at MU = 200, linear in MU);
then a tube or strip fires once per event (the earlier hit is kept), and the hits of an event are
shuffled. All files share one detector (chamber alignment) and the seed fixes every byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from muonreg.data import root_layout
from muonreg.data.pileup import background_hits
from muonreg.data.simulate import SimulationConfig, _first_per_readout, simulate_events

NO_HIT_LIMIT = np.iinfo(np.int16).max  # the layout's num_hits is int16


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


def write_simulated_root(
    out_dir: str | Path,
    n_events: int,
    seed: int = 0,
    files: int = 1,
    pileup: float = 0.0,
    config: SimulationConfig | None = None,
    progress: bool = True,
) -> Path:
    """Write `n_events` simulated events as `files` ROOT files in `out_dir` (created; written in
    `<out_dir>.partial` and renamed when complete)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another --out")
    config = dataclasses.replace(
        config or SimulationConfig(), alignment_seed=seed
    )  # one detector for all files
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        sizes = [len(part) for part in np.array_split(np.arange(n_events), files)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for k in tqdm(range(files), desc="simulating", unit="file", disable=not progress):
            hits, tracks = simulate_dump(sizes[k], seed * 10_000 + k, pileup, config)
            numbers = np.arange(starts[k], starts[k + 1])
            root_layout.write_tree(tmp_dir / f"simulated_{k:04d}.root", hits, tracks, numbers)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    tmp_dir.rename(out_dir)
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, required=True, help="number of events (each with a muon)")
    parser.add_argument(
        "--out", type=Path, required=True, help="output directory of *.root files (must not exist)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--files", type=int, default=1, help="number of ROOT files")
    parser.add_argument(
        "--pileup", type=float, default=0.0, help="mean pile-up <mu>: 200 gives ~7 260 hits per event"
    )

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
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from muonreg.data import root_layout
from muonreg.data.pileup import detector_config, dump_blocks, simulate_dump
from muonreg.data.simulate import SimulationConfig


def write_simulated_root(
    out_dir: str | Path,
    n_events: int,
    seed: int = 0,
    files: int = 1,
    pileup: float = 0.0,
    config: SimulationConfig | None = None,
    progress: bool = True,
    rntuple: bool = False,
) -> Path:
    """Write `n_events` simulated events as `files` ROOT files in `out_dir` (created; written in
    `<out_dir>.partial` and renamed when complete): TTrees, or RNTuples with `rntuple`."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another --out")
    config = detector_config(seed, config)  # one detector for all files
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        blocks = dump_blocks(n_events, seed, files)
        for k, (block_seed, first, size) in enumerate(
            tqdm(blocks, desc="simulating", unit="file", disable=not progress)
        ):
            hits, tracks = simulate_dump(size, block_seed, pileup, config)
            numbers = np.arange(first, first + size)
            root_layout.write_tree(tmp_dir / f"simulated_{k:04d}.root", hits, tracks, numbers, rntuple)
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


def add_root_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rntuple", action="store_true", help="write RNTuples (ATLAS's format from Run 4) instead of TTrees"
    )

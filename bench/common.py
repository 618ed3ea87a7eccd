"""Shared by the benchmarks: a description of the machine and cached benchmark datasets."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from muonreg.data.format import is_dataset
from muonreg.data.simulate import SimulationConfig, write_simulated_dataset

OUT = Path(os.environ.get("MUONREG_BENCH_OUT", Path(__file__).resolve().parent / "out"))  # datasets


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, torch {torch.__version__}"


def arguments(doc: str | None, events: int) -> argparse.ArgumentParser:
    """The command line every benchmark shares: how many simulated events, and their seed."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=events, help="simulated events (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="simulator seed")
    return parser


def header(argv: list[str]) -> None:
    print(f"# command: python {' '.join(argv)}")
    print(f"# machine: {machine()}")


def bench_dataset(events: int, multiplicity: str = "high", compressed: bool = True, seed: int = 0) -> Path:
    """A simulated dataset under bench/out, written once per setting (gzip like the reference preparation)."""
    name = f"{multiplicity}-{events}-{'gzip' if compressed else 'chunked'}-s{seed}"
    path = OUT / name
    if not is_dataset(path):
        write_simulated_dataset(
            path,
            events,
            seed=seed,
            files=max(1, events // 5000),
            config=SimulationConfig(multiplicity=multiplicity),
            compression="gzip" if compressed else None,
        )
    return path

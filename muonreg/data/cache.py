"""The simulated default dataset, generated once per distinct setting and reused: a tracking
dataset, or with pile-up a filter dataset (`muonreg.data.pileup`).

Its directory name is a hash of every simulator setting and of the simulator's physics version
(`muonreg.versions`), so changing a setting or the physics regenerates, and changing neither
never does. Generation holds a file lock, so parallel sweep jobs wait for one writer instead of
racing. Plain values only: the data layer never reads Hydra configuration.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from muonreg.data.format import is_dataset
from muonreg.data.pileup import write_pileup_dataset
from muonreg.data.simulate import SimulationConfig, write_simulated_dataset
from muonreg.locking import exclusive
from muonreg.versions import SIMULATOR_VERSION


def cache_key(events: int, seed: int, files: int, config: SimulationConfig, pileup: float = 0.0) -> str:
    settings = {
        "simulator_version": SIMULATOR_VERSION,
        "events": events,
        "seed": seed,
        "files": files,
        **config.to_dict(),
        **({"pileup": pileup} if pileup else {}),  # tracking datasets keep the keys they had
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def ensure_simulated(
    cache_dir: str | Path,
    events: int,
    seed: int,
    files: int,
    config: SimulationConfig,
    pileup: float = 0.0,
    progress: bool = True,
) -> Path:
    """The cached simulated dataset for these settings, generated first if missing: at `pileup` > 0
    the filter dataset of that many events before the reference cuts."""
    path = Path(cache_dir) / f"simulated-{cache_key(events, seed, files, config, pileup)}"
    if is_dataset(path):
        return path
    with exclusive(path.with_suffix(".lock")):
        if not is_dataset(path):  # another process may have written it while we waited
            print(f"Simulating {events} events into {path} (once; reused by later runs)")
            if pileup:
                write_pileup_dataset(path, events, seed, files, pileup, config, progress=progress)
            else:
                write_simulated_dataset(
                    path, events, seed=seed, files=files, config=config, progress=progress
                )
    return path

"""Where a run's dataset comes from: a user's directory (`data.path`) or the simulated cache.

The simulated default is generated once per distinct setting and reused: its directory name is
a hash of every simulator setting, so changing one regenerates and changing none never does.
Generation holds a file lock, so parallel sweep jobs wait for one writer instead of racing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

import muonreg
from muonreg.config import ConfigError
from muonreg.data.format import is_dataset

if TYPE_CHECKING:
    from muonreg.data.simulate import SimulationConfig

_RUN_KEYS = ("events", "seed", "files")


def simulation_settings(simulation: DictConfig | dict) -> tuple[dict, SimulationConfig]:
    """(events/seed/files, SimulationConfig) from the `data.simulation` config node."""
    from muonreg.data.simulate import SimulationConfig  # runs on real data never load the simulator

    raw = (
        OmegaConf.to_container(simulation, resolve=True)
        if isinstance(simulation, DictConfig)
        else dict(simulation)
    )
    run = {k: raw.pop(k) for k in _RUN_KEYS}
    known = set(SimulationConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"data.simulation has unknown key(s) {unknown}; allowed: {sorted(known | set(_RUN_KEYS))}"
        )
    return run, SimulationConfig(**raw)


def cache_key(run: dict, config: SimulationConfig) -> str:
    settings = {"version": muonreg.__version__, **run, **config.to_dict()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


@contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_simulated(cache_dir: str | Path, simulation: DictConfig | dict, progress: bool = True) -> Path:
    """The cached simulated dataset for these settings, generated first if missing."""
    run, config = simulation_settings(simulation)
    path = Path(cache_dir) / f"simulated-{cache_key(run, config)}"
    if is_dataset(path):
        return path
    from muonreg.data.simulate import write_simulated_dataset

    with _locked(path.with_suffix(".lock")):
        if not is_dataset(path):  # another process may have written it while we waited
            print(f"Simulating {run['events']} events into {path} (once; reused by later runs)")
            write_simulated_dataset(
                path, run["events"], seed=run["seed"], files=run["files"], config=config, progress=progress
            )
    return path


def dataset_path(cfg: DictConfig, progress: bool = True) -> Path:
    """The dataset directory a run trains on: data.path if set, else the simulated cache."""
    if cfg.data.path is not None:
        return Path(str(cfg.data.path))  # checked by muonreg.config.validate
    return ensure_simulated(cfg.paths.data, cfg.data.simulation, progress=progress)


def ensure_default_dataset() -> Path:
    """Generate (if needed) the dataset that `python train.py` with no overrides uses."""
    from hydra import compose, initialize_config_dir

    from muonreg.config import project_root

    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="train")
    return dataset_path(cfg)

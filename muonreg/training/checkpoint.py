"""Checkpoints that let a killed run continue exactly where it stopped.

A checkpoint holds the model, optimiser, scheduler, the position in the epoch, early-stopping
state, every RNG state and the MLflow run id. It is written to a temporary file and renamed, so
a kill during the write leaves the previous checkpoint intact. A small JSON sidecar carries the
config hash, so `resume=auto` finds the newest unfinished run of the same config without
loading every checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

# Keys that do not change what a run computes: where it logs, where it writes, whether it resumes.
_NOT_HASHED = ("resume", "tracking", "paths")


def config_hash(cfg: DictConfig) -> str:
    container = OmegaConf.to_container(cfg, resolve=True)
    container = {k: v for k, v in container.items() if k not in _NOT_HASHED and k != "hydra"}
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, state: dict[str, Any], sidecar: dict[str, Any]) -> None:
    """Atomically write `state` to `path` and `sidecar` to `path.json`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    tmp_json = path.with_name(path.name + ".json.tmp")
    tmp_json.write_text(json.dumps({**sidecar, "path": str(path)}, indent=1))
    os.replace(tmp_json, path.with_name(path.name + ".json"))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    # Our own files: they carry numpy RNG state, so the full unpickler is needed.
    return torch.load(path, map_location="cpu", weights_only=False)


def find_resumable(search_dirs: list[str | Path], cfg_hash: str) -> Path | None:
    """The newest unfinished `last.pt` written by a run of the same config, if any."""
    candidates = []
    for root in search_dirs:
        for sidecar in Path(root).glob("**/checkpoints/last.pt.json"):
            try:
                info = json.loads(sidecar.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if (
                info.get("config_hash") == cfg_hash
                and not info.get("finished")
                and Path(info["path"]).is_file()
            ):
                candidates.append((sidecar.stat().st_mtime, Path(info["path"])))
    return max(candidates)[1] if candidates else None

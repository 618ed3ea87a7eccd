"""Checkpoints that let a killed run continue exactly where it stopped.

A checkpoint holds the model, optimiser, scheduler, the position in the epoch, early-stopping
state, every RNG state (CPU and CUDA, of every rank) and the MLflow run id. It is written to a temporary file and renamed, so
a kill during the write leaves the previous checkpoint intact. A small JSON sidecar says what it
holds (epoch, step, whether training finished) to tools that do not load torch. Which run a
checkpoint belongs to, and whether that run is done, is its run directory's business
(muonreg.training.rundir).
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
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any], sidecar: dict[str, Any]) -> None:
    """Atomically write `state` to `path` and `sidecar` to `path.json`; an OSError when the files
    cannot be written (no permission, no room: opened here, so not torch's C++ error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        torch.save(state, file)
    os.replace(tmp, path)
    tmp_json = path.with_name(path.name + ".json.tmp")
    tmp_json.write_text(json.dumps({**sidecar, "path": str(path)}, indent=1))
    os.replace(tmp_json, path.with_name(path.name + ".json"))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    # Our own files: they carry numpy RNG state, so the full unpickler is needed.
    return torch.load(path, map_location="cpu", weights_only=False)


def replace_model(path: Path, model_state: dict[str, Any]) -> None:
    """Rewrite the checkpoint at `path` with other model weights and buffers (a calibration fitted
    after training), everything else and its sidecar as they were."""
    state = load_checkpoint(path)
    state["model"] = model_state
    save_checkpoint(path, state, json.loads(path.with_name(path.name + ".json").read_text()))

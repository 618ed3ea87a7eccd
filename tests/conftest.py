"""Shared fixtures: small datasets written straight with h5py in the reference layout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pytest
import torch
import yaml

from muonreg.data.schema import HIT_FEATURES, TRACK_FEATURES

from train_cli import mlflow_template, run_train, runs

# The tests' tensors are tiny: on a 2-core machine intra-op threads only wait on each other.
torch.set_num_threads(1)

# Fixtures made once and read by several tests (trained runs, datasets): `make test` runs the suite on
# pytest-xdist workers (--dist loadgroup), and the tests that share one of these share a worker, so it
# is made once there, not once per worker.
SHARED_FIXTURES = ("smoke_run", "straight_parameters", "filter_run", "trained", "loaders", "batch", "sample")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        shared = [name for name in SHARED_FIXTURES if name in getattr(item, "fixturenames", ())]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))


def random_events(n: int, seed: int = 0, max_tracks: int = 2) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Plausible-looking events in schema column order (not physics: only shapes and ranges)."""
    rng = np.random.default_rng(seed)
    hits, tracks = [], []
    for _ in range(n):
        n_tracks = int(rng.integers(1, max_tracks + 1))
        n_hits = int(rng.integers(3, 40))
        h = rng.normal(size=(n_hits, len(HIT_FEATURES))).astype(np.float32) * 1000
        link = rng.integers(-1, n_tracks, size=n_hits)
        h[:, HIT_FEATURES.index("spacePoint_truthLink")] = link
        h[:, HIT_FEATURES.index("spacePoint_technology")] = rng.choice([0, 2, 3], size=n_hits)
        t = np.stack(
            [
                rng.uniform(5, 200, n_tracks),
                rng.uniform(-2.7, 2.7, n_tracks),
                rng.uniform(-np.pi, np.pi, n_tracks),
                rng.choice([-1.0, 1.0], n_tracks),
            ],
            axis=1,
        ).astype(np.float32)
        hits.append(h)
        tracks.append(t)
    return hits, tracks


def write_reference_dataset(
    path: Path,
    hits: list[np.ndarray],
    tracks: list[np.ndarray],
    *,
    hit_columns: Sequence[str] = HIT_FEATURES,
    track_columns: Sequence[str] = TRACK_FEATURES,
    files: int = 1,
    compression: str | None = "gzip",
    max_hits: int | None = None,
) -> Path:
    """Write events (given in schema column order) with plain h5py, columns permuted to `hit_columns`.

    This is deliberately not `DatasetWriter`: it stands for a dataset made by the reference
    preparation, so reading it proves compatibility rather than self-consistency.
    """
    hit_perm = [HIT_FEATURES.index(c) for c in hit_columns]
    track_perm = [TRACK_FEATURES.index(c) for c in track_columns]
    (path / "data").mkdir(parents=True)
    chunks, file_idx, row_idx = [], [], []
    for k, part in enumerate(np.array_split(np.arange(len(hits)), files)):
        width = max_hits or max(len(hits[i]) for i in part)
        h = np.full((len(part), width, len(hit_columns)), np.nan, np.float32)
        depth = max(2, *(len(tracks[i]) for i in part))
        t = np.full((len(part), depth, len(track_columns)), np.nan, np.float32)
        for row, i in enumerate(part):
            h[row, : len(hits[i])] = hits[i][:, hit_perm]
            t[row, : len(tracks[i])] = tracks[i][:, track_perm]
        name = f"data/chunk_{k}.h5"
        with h5py.File(path / name, "w") as f:
            opts = (
                {"compression": "gzip", "compression_opts": 4}
                if compression
                else {"chunks": (1, width, h.shape[2])}
            )
            f.create_dataset("hits", data=h, **opts)
            f.create_dataset("tracks", data=t)
            f.create_dataset("num_hits", data=np.array([len(hits[i]) for i in part], np.int16))
            f.create_dataset("num_tracks", data=np.array([len(tracks[i]) for i in part], np.int16))
            f.create_dataset("event_numbers", data=np.asarray(part, np.int64) + 1000)
            f.attrs["num_events"] = len(part)
        chunks.append(
            {"h5_file": name, "source_root_file": f"src_{k}.root", "event_count": len(part), "worker_id": k}
        )
        file_idx += [k] * len(part)
        row_idx += list(range(len(part)))
    np.save(path / "event_file_indices.npy", np.array(file_idx, np.int64))
    np.save(path / "event_row_indices.npy", np.array(row_idx, np.int64))
    meta = {
        "hit_features": list(hit_columns),
        "track_features": list(track_columns),
        "processing_parameters": {"min_pt": 5.0},
        "event_mapping": {"chunk_summary": chunks},
    }
    (path / "metadata.yaml").write_text(yaml.safe_dump(meta))
    return path


@pytest.fixture(scope="session")
def empty_mlflow_db() -> Path:
    """An MLflow SQLite database with its schema made (MLflow's migrations take ~10 s): tests copy it
    to `<root>/mlflow.db` rather than each paying for a fresh one."""
    return mlflow_template()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The end-to-end runs' shared simulated-data cache: the first run simulates the smoke dataset
    (and its held-out set), every later one reads it."""
    return tmp_path_factory.mktemp("data")


SMOKE_RUN_OVERRIDES = ("assignment_threshold=0.2", "tracking.register_as=muon-tracker")


class SmokeRun(NamedTuple):
    root: Path  # paths.root: outputs/ and mlflow.db
    best: Path  # the chosen checkpoint
    run_id: str
    stdout: str  # what train.py printed
    stderr: str


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, data_dir) -> SmokeRun:
    """One finished smoke-sized `train.py` run (assignment_threshold=0.2, its model registered as
    muon-tracker), shared by every test that reads a trained run; they only add to it (metrics under
    their own prefixes, artifacts), so the order they run in does not matter."""
    root = tmp_path_factory.mktemp("smoke_run")
    result = run_train(root, data_dir, *SMOKE_RUN_OVERRIDES)
    (run,) = runs(root)
    (best,) = root.glob("outputs/**/checkpoints/best.pt")
    return SmokeRun(root, best, run.info.run_id, result.stdout, result.stderr)


@pytest.fixture
def reference_dataset(tmp_path: Path) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    hits, tracks = random_events(30)
    return write_reference_dataset(tmp_path / "ref", hits, tracks, files=2), hits, tracks


FIELDS = ["truthMuon_eta", "truthMuon_phi", "truthMuon_pt", "truthMuon_q"]


def make_model(task: str = "weighted_pooling", input_size: int = 6, dim: int = 16, **task_kwargs):
    """A small MaskFormer with the given regression task (tests only)."""
    from muonreg.models import MaskFormer
    from muonreg.tasks import (
        ObjectHitMaskTask,
        ObjectRegressionTask,
        ObjectValidTask,
        WeightedPoolingObjectHitRegressionTask,
    )

    fields = task_kwargs.pop("fields", FIELDS)
    inverse = task_kwargs.pop("inverse_fields", ["truthMuon_pt"])
    if task == "weighted_pooling":
        regression = WeightedPoolingObjectHitRegressionTask(dim, input_size, fields, inverse, **task_kwargs)
    else:
        regression = ObjectRegressionTask(dim, fields, inverse, **task_kwargs)
    return MaskFormer(
        input_size,
        dim=dim,
        heads=4,
        valid_task=ObjectValidTask(dim),
        hit_mask_task=ObjectHitMaskTask(dim),
        regression_task=regression,
    )


def synthetic_batch(b: int = 4, m: int = 20, f: int = 6, seed: int = 0, fields=FIELDS):
    """A batch in the data contract: hits, per-feature validity, 0-2 muons per event, targets."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n_muons = torch.randint(0, 3, (b,), generator=g)
    n_hits = torch.randint(m // 2, m + 1, (b,), generator=g)
    hit_valid = torch.arange(m) < n_hits[:, None]
    link = torch.randint(-1, 2, (b, m), generator=g)
    link = torch.where(link < n_muons[:, None], link, -1)
    particle_valid = torch.arange(2) < n_muons[:, None]
    hit_x_valid = hit_valid.unsqueeze(-1) & (torch.rand(b, m, f, generator=g) > 0.1)
    batch = {
        "hit_x": torch.randn(b, m, f, generator=g) * hit_x_valid,
        "hit_x_valid": hit_x_valid,
        "hit_valid": hit_valid,
        "particle_valid": particle_valid,
        "particle_hit_valid": (link.unsqueeze(1) == torch.arange(2)[None, :, None]) & hit_valid.unsqueeze(1),
    }
    values = {
        "truthMuon_eta": torch.rand(b, 2, generator=g) * 5.4 - 2.7,
        "truthMuon_phi": torch.rand(b, 2, generator=g) * 6.28 - 3.14,
        "truthMuon_pt": 5 + torch.rand(b, 2, generator=g) * 195,
        "truthMuon_q": torch.where(torch.rand(b, 2, generator=g) > 0.5, 1.0, -1.0),
    }
    values["truthMuon_qpt"] = values["truthMuon_q"] / values["truthMuon_pt"]
    for name in fields:
        batch[f"particle_{name}"] = torch.where(particle_valid, values[name], 0.0)
    return batch

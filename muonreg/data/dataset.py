"""The torch side of the data: per-event arrays, batch collation with masks, hit-count bucketing.

Batch contract (what `collate` returns and the model consumes):

    hit_x               float32 [B, M, F]  scaled features, 0 where missing or padded
    hit_x_valid         bool    [B, M, F]  per-feature, per-hit validity
    hit_valid           bool    [B, M]     real hit vs padding
    particle_valid      bool    [B, P]     truth slot holds a muon
    particle_hit_valid  bool    [B, P, M]  hit m belongs to muon p
    particle_<field>    float32 [B, P]     targets, 0 (never NaN) in empty slots
    event_index         int64   [B]        dataset index of each event

M is the largest hit count in the batch, so batches of similar events (HitCountBatchSampler)
carry little padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from muonreg.data.features import HitFeatures
from muonreg.data.format import DatasetReader
from muonreg.data.schema import TRUTH_LINK

QPT = "truthMuon_qpt"  # derived target q/pT (GeV^-1): the signed curvature


class MuonEventDataset(Dataset):
    """Events of a `DatasetReader` (optionally a subset) as model-ready numpy arrays."""

    def __init__(
        self,
        reader: DatasetReader,
        features: HitFeatures,
        target_fields: Sequence[str],
        max_particles: int,
        indices: np.ndarray | None = None,
    ):
        self.reader, self.features = reader, features
        self.target_fields = list(target_fields)
        self.max_particles = max_particles
        self.indices = np.arange(len(reader)) if indices is None else np.asarray(indices, dtype=np.int64)
        stored = set(reader.track_features) | {QPT}
        unknown = [f for f in self.target_fields if f not in stored]
        if unknown:
            raise ValueError(
                f"unknown target field(s) {unknown}; the dataset has {reader.track_features} and {QPT}"
            )
        if QPT in self.target_fields and not {"truthMuon_pt", "truthMuon_q"} <= set(reader.track_features):
            raise ValueError(f"{QPT} needs truthMuon_pt and truthMuon_q in the dataset's track_features")
        self._link = reader.hit_index[TRUTH_LINK]

    def __len__(self) -> int:
        return len(self.indices)

    def num_hits(self) -> np.ndarray:
        """Hit count per item, for bucketing."""
        return self.reader.num_hits()[self.indices]

    def _target(self, tracks: np.ndarray, name: str) -> np.ndarray:
        col = self.reader.track_index
        if name == QPT:
            pt = tracks[:, col["truthMuon_pt"]]
            return tracks[:, col["truthMuon_q"]] / np.maximum(pt, 1e-6)
        return tracks[:, col[name]]

    def __getitem__(self, item: int) -> dict[str, np.ndarray]:
        index = int(self.indices[item])
        event = self.reader.read(index)
        n_tracks = len(event.tracks)
        if n_tracks > self.max_particles:
            file_idx, row = self.reader.locate(index)
            raise ValueError(
                f"{self.reader.files[file_idx]}: event row {row} has {n_tracks} tracks, more than "
                f"max_particles={self.max_particles}"
            )
        x, x_valid = self.features(event.hits)
        link = event.hits[:, self._link]
        slots = np.arange(self.max_particles)
        out = {
            "hit_x": x,
            "hit_x_valid": x_valid,
            "particle_valid": slots < n_tracks,
            "particle_hit_valid": link[None, :] == slots[:, None],
            "event_index": np.int64(index),
        }
        for name in self.target_fields:
            values = np.zeros(self.max_particles, dtype=np.float32)
            values[:n_tracks] = self._target(event.tracks, name)
            out[f"particle_{name}"] = values
        return out


_PADDED = {"hit_x", "hit_x_valid", "particle_hit_valid"}


def collate(events: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack events, padding hits to the batch maximum (padding is 0 / False)."""
    b = len(events)
    m = max(len(e["hit_x"]) for e in events)
    f = events[0]["hit_x"].shape[1]
    p = len(events[0]["particle_valid"])
    hit_x = np.zeros((b, m, f), dtype=np.float32)
    hit_x_valid = np.zeros((b, m, f), dtype=bool)
    hit_valid = np.zeros((b, m), dtype=bool)
    particle_hit_valid = np.zeros((b, p, m), dtype=bool)
    for i, e in enumerate(events):
        n = len(e["hit_x"])
        hit_x[i, :n] = e["hit_x"]
        hit_x_valid[i, :n] = e["hit_x_valid"]
        hit_valid[i, :n] = True
        particle_hit_valid[i, :, :n] = e["particle_hit_valid"]
    batch = {
        "hit_x": hit_x,
        "hit_x_valid": hit_x_valid,
        "hit_valid": hit_valid,
        "particle_hit_valid": particle_hit_valid,
    }
    for key in events[0].keys() - _PADDED:
        batch[key] = np.stack([e[key] for e in events])
    return {k: torch.from_numpy(v) for k, v in batch.items()}


class HitCountBatchSampler(Sampler[list[int]]):
    """Batches of events with similar hit counts, in random order: little padding, same events per epoch.

    Indices are shuffled, cut into pools of `pool_batches` batches, each pool sorted by hit count
    and cut into batches; the batches are then shuffled. `set_epoch` reseeds, like DistributedSampler.
    """

    def __init__(
        self,
        num_hits: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        pool_batches: int = 50,
        drop_last: bool = False,
    ):
        self.num_hits = np.asarray(num_hits)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.pool = batch_size * pool_batches
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.num_hits)) if self.shuffle else np.arange(len(self.num_hits))
        batches = []
        for start in range(0, len(order), self.pool):
            pool = order[start : start + self.pool]
            pool = pool[np.argsort(self.num_hits[pool], kind="stable")]
            batches += [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return iter([b.tolist() for b in batches])

    def __len__(self) -> int:
        full_pools, tail = divmod(len(self.num_hits), self.pool)
        per_pool = (
            (lambda size: size // self.batch_size)
            if self.drop_last
            else (lambda size: -(-size // self.batch_size))
        )
        return full_pools * per_pool(self.pool) + per_pool(tail)


def make_loader(
    dataset: MuonEventDataset,
    batch_size: int,
    *,
    shuffle: bool,
    bucket_by_hits: bool = True,
    num_workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over `dataset`, bucketed by hit count unless `bucket_by_hits=False`."""
    common = {
        "collate_fn": collate,
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": num_workers > 0,
    }
    if bucket_by_hits:
        sampler = HitCountBatchSampler(
            dataset.num_hits(), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        return DataLoader(dataset, batch_sampler=sampler, **common)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator, **common
    )


def split_indices(n_events: int, fractions: Sequence[float]) -> dict[str, np.ndarray]:
    """Contiguous train/val/test ranges (contiguous keeps reads local in the files)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not 0 < sum(fractions) <= 1 + 1e-9:
        raise ValueError(
            f"split fractions must be three non-negative numbers summing to at most 1, got {list(fractions)}"
        )
    bounds = np.floor(np.cumsum([0, *fractions]) * n_events).astype(int)
    return {name: np.arange(bounds[i], bounds[i + 1]) for i, name in enumerate(("train", "val", "test"))}

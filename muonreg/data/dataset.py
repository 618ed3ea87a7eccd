"""The torch side of the data: per-event arrays, batch collation with masks, hit-count bucketing.

Batch contract (what `collate` returns and the model consumes):

    hit_x               float32 [B, M, F]  scaled features, 0 where missing or padded
    hit_x_valid         bool    [B, M, F]  per-feature, per-hit validity
    hit_valid           bool    [B, M]     real hit vs padding
    hit_geometry        float32 [B, M, G]  what a track fit needs, in metres (data.geometry), 0 when padded
    hit_geometry_valid  bool    [B, M]     the hit has every column the fit needs
    particle_valid      bool    [B, P]     truth slot holds a muon
    particle_hit_valid  bool    [B, P, M]  hit m belongs to muon p
    particle_<field>    float32 [B, P]     targets, 0 (never NaN) in empty slots
    event_index         int64   [B]        dataset index of each event

M is the largest hit count in the batch, so batches of similar events (EventBatchSampler)
carry little padding.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from muonreg.data.features import HitFeatures
from muonreg.data.format import DatasetReader
from muonreg.data.geometry import HitGeometry
from muonreg.data.schema import QPT, TRUTH_LINK
from muonreg.numerics import safe_inverse
from muonreg.training.interrupts import ignore_stop_signals


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
        self.geometry = HitGeometry(reader.hit_features)

    def __len__(self) -> int:
        return len(self.indices)

    def num_hits(self) -> np.ndarray:
        """Hit count per item, for bucketing."""
        return self.reader.num_hits()[self.indices]

    def _target(self, tracks: np.ndarray, name: str) -> np.ndarray:
        col = self.reader.track_index
        if name == QPT:
            pt = tracks[:, col["truthMuon_pt"]]
            return tracks[:, col["truthMuon_q"]] * safe_inverse(pt)
        return tracks[:, col[name]]

    def __getitem__(self, item: int) -> dict[str, np.ndarray]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Several events at once (the DataLoader asks for a batch): the per-hit features and
        geometry are computed over all their hits together, one numpy pass instead of one per event."""
        indices = [int(self.indices[item]) for item in items]
        events = [self.reader.read(index) for index in indices]
        for index, event in zip(indices, events, strict=True):
            if len(event.tracks) > self.max_particles:
                file_idx, row = self.reader.locate(index)
                raise ValueError(
                    f"{self.reader.files[file_idx]}: event row {row} has {len(event.tracks)} tracks, more "
                    f"than max_particles={self.max_particles}"
                )
        hits = np.concatenate([event.hits for event in events])
        x, x_valid = self.features(hits)
        geometry, geometry_valid = self.geometry(hits)
        link = hits[:, self._link]
        per_hit = {
            "hit_x": x,
            "hit_x_valid": x_valid,
            "hit_geometry": geometry,
            "hit_geometry_valid": geometry_valid,
        }
        bounds = np.cumsum([len(event.hits) for event in events])[:-1]
        per_hit_split = {key: np.split(value, bounds) for key, value in per_hit.items()}
        links = np.split(link, bounds)
        slots = np.arange(self.max_particles)
        out = []
        for i, (index, event) in enumerate(zip(indices, events, strict=True)):
            n_tracks = len(event.tracks)
            item = {key: value[i] for key, value in per_hit_split.items()}
            item["particle_valid"] = slots < n_tracks
            item["particle_hit_valid"] = links[i][None, :] == slots[:, None]
            item["event_index"] = np.int64(index)
            for name in self.target_fields:
                values = np.zeros(self.max_particles, dtype=np.float32)
                values[:n_tracks] = self._target(event.tracks, name)
                item[f"particle_{name}"] = values
            out.append(item)
        return out


_PADDED = {"hit_x", "hit_x_valid", "hit_geometry", "hit_geometry_valid", "particle_hit_valid"}


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
    geometry = np.zeros((b, m, events[0]["hit_geometry"].shape[1]), dtype=np.float32)
    geometry_valid = np.zeros((b, m), dtype=bool)
    for i, e in enumerate(events):
        n = len(e["hit_x"])
        hit_x[i, :n] = e["hit_x"]
        hit_x_valid[i, :n] = e["hit_x_valid"]
        hit_valid[i, :n] = True
        particle_hit_valid[i, :, :n] = e["particle_hit_valid"]
        geometry[i, :n] = e["hit_geometry"]
        geometry_valid[i, :n] = e["hit_geometry_valid"]
    batch = {
        "hit_x": hit_x,
        "hit_x_valid": hit_x_valid,
        "hit_valid": hit_valid,
        "hit_geometry": geometry,
        "hit_geometry_valid": geometry_valid,
        "particle_hit_valid": particle_hit_valid,
    }
    for key in events[0].keys() - _PADDED:
        batch[key] = np.stack([e[key] for e in events])
    return {k: torch.from_numpy(v) for k, v in batch.items()}


class EventBatchSampler(Sampler[list[int]]):
    """Deterministic batches for an epoch: bucketed by hit count, local on disk, resumable, shardable.

    Shuffled epochs take whole storage blocks (`blocks`: an id per event, see
    DatasetReader.block_ids) in random order and cut that order into pools of `pool_batches`
    batches; each pool is shuffled, sorted by hit count (`bucket`) and cut into batches, which
    are shuffled within the pool. So a batch holds events of similar size (little padding) and a
    pool touches only a few blocks (each decompressed once per reader). The order depends only
    on (seed, epoch): `set_epoch(epoch, start_batch=k)` resumes a killed epoch at batch k, and
    rank r of `world_size` takes every world_size-th batch (trimmed so all ranks take as many).
    The batches of one step, one per rank, are neighbours in hit count (they are shuffled as a
    group), so no rank waits at the gradient all-reduce for another's much larger batch.
    """

    def __init__(
        self,
        num_hits: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        bucket: bool = True,
        blocks: np.ndarray | None = None,
        seed: int = 0,
        pool_batches: int = 10,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.num_hits = np.asarray(num_hits)
        self.blocks = None if blocks is None else np.asarray(blocks)
        self.batch_size, self.shuffle, self.bucket, self.seed = batch_size, shuffle, bucket, seed
        self.pool = batch_size * pool_batches
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self, rng: np.random.Generator) -> np.ndarray:
        n = len(self.num_hits)
        if not self.shuffle:
            return np.arange(n)
        if self.blocks is None:
            return rng.permutation(n)
        unique, inverse = np.unique(self.blocks, return_inverse=True)
        block_rank = rng.permutation(len(unique))[inverse]
        return np.lexsort((rng.random(n), block_rank))  # whole blocks in random order

    def batches(self) -> list[np.ndarray]:
        """All batches of the current epoch for this rank, before skipping `start_batch`."""
        rng = np.random.default_rng((self.seed, self.epoch))
        order = self._order(rng)
        size, ranks, batches, rest = self.batch_size, self.world_size, [], []
        for start in range(0, len(order), self.pool):
            pool = order[start : start + self.pool]
            if self.bucket:
                pool = pool[np.argsort(self.num_hits[pool], kind="stable")]
            part = [pool[i : i + size] for i in range(0, len(pool), size)]
            if self.drop_last:
                part = [b for b in part if len(b) == size]
            steps = [part[i : i + ranks] for i in range(0, len(part), ranks)]  # one batch per rank
            if self.shuffle:
                steps = [steps[i] for i in rng.permutation(len(steps))]
            batches += [b for step in steps if len(step) == ranks for b in step]
            rest += [b for step in steps if len(step) < ranks for b in step]
        batches += rest
        usable = len(batches) - len(batches) % ranks
        return batches[self.rank : usable : ranks]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([b.tolist() for b in self.batches()[self.start_batch :]])

    def __len__(self) -> int:
        return len(self.batches()) - self.start_batch


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
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader over `dataset` driven by an EventBatchSampler (reach it as `loader.batch_sampler`)."""
    num_hits = dataset.num_hits() if bucket_by_hits else np.zeros(len(dataset), dtype=np.int32)
    sampler = EventBatchSampler(
        num_hits,
        batch_size,
        shuffle=shuffle,
        bucket=bucket_by_hits,
        blocks=dataset.reader.block_ids(dataset.indices),
        seed=seed,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
    )
    dataset.reader.reserve_cache(sampler.pool)  # each worker keeps a whole pool's blocks
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals,
        # The platform's own start method: inside a joblib (loky) sweep job the inherited default
        # context is loky's, which cannot start DataLoader workers.
        multiprocessing_context=multiprocessing.get_all_start_methods()[0] if num_workers > 0 else None,
    )


def split_indices(n_events: int, fractions: Sequence[float]) -> dict[str, np.ndarray]:
    """Contiguous train/val/test ranges (contiguous keeps reads local in the files)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not 0 < sum(fractions) <= 1 + 1e-9:
        raise ValueError(
            f"split fractions must be three non-negative numbers summing to at most 1, got {list(fractions)}"
        )
    bounds = np.floor(np.cumsum([0, *fractions]) * n_events).astype(int)
    return {name: np.arange(bounds[i], bounds[i + 1]) for i, name in enumerate(("train", "val", "test"))}

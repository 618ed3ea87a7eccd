"""Dataset items, collation with masks, hit-count bucketing and multi-worker loading."""

import numpy as np
import pytest
import torch

from muonreg.data.dataset import EventBatchSampler, MuonEventDataset, collate, make_loader, split_indices
from muonreg.data.features import HitFeatures
from muonreg.data.format import DatasetReader
from muonreg.data.schema import HIT_FEATURES, TRACK_FEATURES

from conftest import random_events, write_reference_dataset

FEATURES = ["spacePoint_globEdgeLowX", "spacePoint_driftR", "spacePoint_technology", "r", "eta"]
TARGETS = ["truthMuon_eta", "truthMuon_phi", "truthMuon_pt", "truthMuon_q", "truthMuon_qpt"]


def _dataset(path, **kwargs) -> MuonEventDataset:
    reader = DatasetReader(path)
    return MuonEventDataset(
        reader, HitFeatures(FEATURES, reader.hit_features), TARGETS, max_particles=2, **kwargs
    )


def test_item_targets_follow_truth_links(reference_dataset):
    path, hits, tracks = reference_dataset
    ds = _dataset(path)
    link = HIT_FEATURES.index("spacePoint_truthLink")
    for i in (0, 7, 29):
        item = ds[i]
        n, k = len(hits[i]), len(tracks[i])
        assert item["hit_x"].shape == (n, len(FEATURES)) and item["hit_x_valid"].shape == (n, len(FEATURES))
        np.testing.assert_array_equal(item["particle_valid"], np.arange(2) < k)
        for p in range(2):
            np.testing.assert_array_equal(item["particle_hit_valid"][p], hits[i][:, link] == p)
        pt = tracks[i][:, TRACK_FEATURES.index("truthMuon_pt")]
        q = tracks[i][:, TRACK_FEATURES.index("truthMuon_q")]
        np.testing.assert_allclose(item["particle_truthMuon_pt"][:k], pt)
        np.testing.assert_allclose(item["particle_truthMuon_qpt"][:k], q / pt, rtol=1e-6)
        assert (item["particle_truthMuon_pt"][k:] == 0).all()  # empty slots carry 0, never NaN


def test_a_batch_read_at_once_equals_its_events_read_alone(reference_dataset):
    """The loader asks for a batch (`__getitems__`): its per-hit arrays are computed over all the
    batch's hits together and must be cut back into exactly each event's own."""
    path, hits, _ = reference_dataset
    ds = _dataset(path)
    items = [29, 0, 7, 7, 13]
    together = ds.__getitems__(items)
    alone = [_dataset(path)[i] for i in items]
    assert [len(e["hit_x"]) for e in together] == [len(hits[i]) for i in items]
    for a, b in zip(together, alone, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    loader = make_loader(ds, 5, shuffle=False, bucket_by_hits=False)
    first = next(iter(loader))
    expected = collate([_dataset(path)[i] for i in range(5)])
    for key in expected:
        torch.testing.assert_close(first[key], expected[key], rtol=0, atol=0, msg=key)


def test_collate_pads_to_batch_maximum_with_masks(reference_dataset):
    path, hits, _ = reference_dataset
    ds = _dataset(path)
    batch = collate([ds[i] for i in range(5)])
    m = max(len(hits[i]) for i in range(5))
    assert batch["hit_x"].shape == (5, m, len(FEATURES))
    assert batch["particle_hit_valid"].shape == (5, 2, m)
    assert batch["hit_valid"].sum(1).tolist() == [len(hits[i]) for i in range(5)]
    assert batch["hit_x"][~batch["hit_valid"]].abs().sum() == 0
    assert not batch["hit_x_valid"][~batch["hit_valid"]].any()
    assert not batch["particle_hit_valid"][:, :, :][~batch["hit_valid"].unsqueeze(1).expand(-1, 2, -1)].any()
    assert batch["event_index"].tolist() == [0, 1, 2, 3, 4]
    for value in batch.values():
        if value.is_floating_point():
            assert torch.isfinite(value).all()


def test_more_muons_than_slots_names_file_and_row(tmp_path):
    hits, tracks = random_events(3, seed=1)
    tracks[1] = np.concatenate([tracks[1], tracks[1], tracks[1]])[:3]
    path = write_reference_dataset(tmp_path / "ref", hits, tracks)
    reader = DatasetReader(path)
    ds = MuonEventDataset(reader, HitFeatures(["r"], reader.hit_features), ["truthMuon_pt"], max_particles=2)
    with pytest.raises(ValueError, match=r"chunk_0\.h5: event row 1 has 3 tracks, more than max_particles=2"):
        ds[1]


def test_unknown_target_is_rejected(reference_dataset):
    path, _, _ = reference_dataset
    reader = DatasetReader(path)
    with pytest.raises(ValueError, match=r"unknown target field\(s\) \['truthMuon_p'\]"):
        MuonEventDataset(reader, HitFeatures(["r"], reader.hit_features), ["truthMuon_p"], max_particles=2)


def test_bucketing_covers_every_event_once_and_reduces_padding():
    rng = np.random.default_rng(0)
    num_hits = rng.integers(60, 600, size=1000)
    sampler = EventBatchSampler(num_hits, 32, seed=3, pool_batches=10)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == list(sampler)  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != batches

    def padding(batches):
        return sum(len(b) * num_hits[b].max() - num_hits[b].sum() for b in batches) / num_hits.sum()

    shuffled = np.random.default_rng(1).permutation(1000)
    plain = [shuffled[i : i + 32] for i in range(0, 1000, 32)]
    assert padding(batches) < 0.1 < 0.5 < padding(plain)
    dropped = EventBatchSampler(num_hits, 32, seed=3, pool_batches=10, drop_last=True)
    assert len(list(dropped)) == len(dropped) and all(len(b) == 32 for b in dropped)


def test_sampler_resumes_mid_epoch_and_shards_ranks():
    num_hits = np.random.default_rng(0).integers(60, 600, size=500)
    sampler = EventBatchSampler(num_hits, 16, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_batch=7)
    assert list(sampler) == full[7:] and len(sampler) == len(full) - 7
    ranks = [EventBatchSampler(num_hits, 16, seed=1, rank=r, world_size=3) for r in range(3)]
    for r in ranks:
        r.set_epoch(2)
    shards = [list(r) for r in ranks]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    steps = list(zip(*shards, strict=True))
    taken = [i for step in steps for b in step for i in b]
    assert len(taken) == len(set(taken)) >= 500 - 3 * 16  # disjoint; less than one step trimmed

    def spread(groups: list) -> float:  # mean hit-count range among the batches of a step
        return float(np.mean([np.ptp([num_hits[b].mean() for b in g]) for g in groups]))

    # the ranks' batches of a step are neighbours in hit count, so no rank waits long for another
    assert spread(steps) < 0.5 * spread([full[i : i + 3] for i in range(0, len(full) - 2, 3)])
    plain = EventBatchSampler(num_hits, 16, shuffle=False, bucket=False)
    assert [i for b in plain for i in b] == list(range(500))


def test_loader_with_workers_matches_single_process(reference_dataset):
    path, _, _ = reference_dataset
    ds = _dataset(path)
    serial = list(make_loader(ds, 8, shuffle=True, seed=5))
    parallel = list(make_loader(ds, 8, shuffle=True, seed=5, num_workers=2))
    assert len(serial) == len(parallel) == 4
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key])
    unbucketed = list(make_loader(ds, 8, shuffle=False, bucket_by_hits=False))
    assert torch.cat([b["event_index"] for b in unbucketed]).tolist() == list(range(30))


def test_split_indices_are_disjoint_and_contiguous():
    split = split_indices(100, [0.8, 0.1, 0.1])
    assert [len(v) for v in split.values()] == [80, 10, 10]
    assert np.concatenate(list(split.values())).tolist() == list(range(100))
    with pytest.raises(ValueError, match="split fractions"):
        split_indices(100, [0.8, 0.3, 0.1])


def test_shuffled_pools_stay_within_a_few_storage_blocks():
    num_hits = np.random.default_rng(0).integers(60, 600, size=2000)
    blocks = np.arange(2000) // 250  # e.g. gzip chunks of 250 events
    sampler = EventBatchSampler(num_hits, 50, blocks=blocks, pool_batches=10, seed=2)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(2000))
    pools = [np.concatenate(batches[i : i + 10]) for i in range(0, len(batches), 10)]
    assert all(len(np.unique(blocks[pool])) <= 3 for pool in pools)  # 500 events: two blocks, three at a seam
    sampler.set_epoch(1)
    assert list(sampler) != batches

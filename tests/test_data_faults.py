"""Broken datasets, made on disk in each test: every fault fails before training, naming file and row."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from muonreg.config import project_root, validate
from muonreg.data.format import DataFormatError, DatasetReader
from muonreg.data.schema import TRACK_FEATURES
from muonreg.training.setup import build_data

from conftest import random_events, write_reference_dataset

PT, Q = TRACK_FEATURES.index("truthMuon_pt"), TRACK_FEATURES.index("truthMuon_q")


def _start(path: Path, *overrides: str):
    """What a run does before its first step: validate the config, then open and check the data."""
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"data.path={path}", *overrides])
    validate(cfg)
    return build_data(cfg, progress=False)


def _dataset(tmp_path: Path, n: int = 40, edit=None, **kwargs) -> Path:
    hits, tracks = random_events(n, seed=7)
    if edit:
        edit(hits, tracks)
    return write_reference_dataset(tmp_path / "ds", hits, tracks, files=2, **kwargs)


def test_a_dataset_without_any_muon_fails_before_training(tmp_path):
    def no_muons(hits, tracks):
        for i in range(len(tracks)):
            tracks[i] = tracks[i][:0]
            hits[i][:, -1] = -1  # every hit noise

    path = _dataset(tmp_path, edit=no_muons)
    with pytest.raises(DataFormatError, match=r"the train split .* holds no muon: .*data/chunk_0\.h5"):
        _start(path)


def test_an_event_with_more_muons_than_max_particles_fails_before_training_naming_the_key(tmp_path):
    def third_muon(hits, tracks):
        tracks[25] = np.concatenate([tracks[25], tracks[25][:1]] * 3)[:3]  # chunk_1 holds 20..39: row 5

    path = _dataset(tmp_path, edit=third_muon)
    with pytest.raises(
        DataFormatError,
        match=r"chunk_1\.h5: event row 5 \(dataset event 25\) has 3 muons, more than data\.max_particles=2 "
        r"\(1 such event\)",
    ):
        _start(path)
    assert len(_start(path, "data.max_particles=3", "model.num_queries=3").datasets["train"])


def test_events_with_muons_but_no_hit_are_counted_in_one_warning_naming_the_first(tmp_path, caplog):
    def no_hits(hits, tracks):
        for i in (3, 24):  # chunk_0 row 3; chunk_1 row 4
            hits[i] = hits[i][:0]

    path = _dataset(tmp_path, edit=no_hits)
    with caplog.at_level(logging.WARNING, logger="muonreg.data.checks"):
        _start(path)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "muonreg.data.checks"]
    assert warning.startswith(
        f"2 events carry truth muons but no hit (the first: {path / 'data/chunk_0.h5'}: event row 3, "
        "dataset event 3)"
    )


@pytest.mark.parametrize(
    ("column", "value", "rule"),
    [
        (PT, 0.0, "finite and > 0"),
        (PT, -3.0, "finite and > 0"),
        (PT, np.inf, "finite and > 0"),
        (Q, 0.5, "±1"),
    ],
)
def test_unphysical_truth_names_file_row_and_column(tmp_path, column, value, rule):
    def spoil(hits, tracks):
        tracks[27][0, column] = value  # file chunk_1 holds events 20..39: row 7

    path = _dataset(tmp_path, edit=spoil)
    name = TRACK_FEATURES[column]
    with pytest.raises(
        DataFormatError, match=rf"chunk_1\.h5: event row 7 \(dataset event 27\): {name}=.* must be {rule}"
    ):
        _start(path)


def test_an_event_row_past_the_file_end_names_file_and_row(tmp_path):
    path = _dataset(tmp_path)
    rows = np.load(path / "event_row_indices.npy")
    rows[5] = 99
    np.save(path / "event_row_indices.npy", rows)
    with pytest.raises(DataFormatError, match=r"chunk_0\.h5: event row 99 \(dataset event 5\) is past"):
        _start(path)


def test_a_truncated_hdf5_file_is_named(tmp_path):
    path = _dataset(tmp_path)
    file = path / "data/chunk_1.h5"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(DataFormatError, match=r"chunk_1\.h5: event row 0 \(dataset event 20\).*truncated"):
        _start(path)


def test_a_corrupted_gzip_chunk_names_file_and_event_row(tmp_path):
    path = _dataset(tmp_path, compression="gzip")
    file = path / "data/chunk_1.h5"
    with h5py.File(file) as f:
        chunk = f["hits"].id.get_chunk_info(0)
    data = bytearray(file.read_bytes())
    middle = chunk.byte_offset + chunk.size // 2
    data[middle : middle + 64] = bytes(64)
    file.write_bytes(bytes(data))
    reader = _start(path).datasets["train"].reader  # the track arrays are intact: training starts
    with pytest.raises(DataFormatError, match=r"chunk_1\.h5: event row 3 \(dataset event 23\).*corrupted"):
        reader.read(23)


def test_an_empty_metadata_file_says_so(tmp_path):
    path = _dataset(tmp_path)
    (path / "metadata.yaml").write_text("")
    with pytest.raises(DataFormatError, match=r"metadata\.yaml is empty; it must list hit_features"):
        _start(path)
    with pytest.raises(DataFormatError, match=r"metadata\.yaml is empty"):
        DatasetReader(path)


def test_debug_smoke_caps_the_events_of_a_user_dataset(tmp_path):
    path = _dataset(tmp_path, n=400)
    data = _start(path, "debug=smoke")
    assert sum(len(ds) for ds in data.datasets.values()) == 300

"""The on-disk layout: round trips, reading reference-made files, and every error with its message."""

import pickle
import tracemalloc

import h5py
import numpy as np
import pytest
import yaml

from muonreg.data.format import DataFormatError, DatasetReader, DatasetWriter, is_dataset
from muonreg.data.schema import HIT_FEATURES, TRACK_FEATURES

from conftest import random_events, write_reference_dataset


@pytest.mark.parametrize("compression", ["gzip", None])
def test_writer_reader_round_trip(tmp_path, compression):
    hits, tracks = random_events(25, seed=1)
    with DatasetWriter(tmp_path / "ds", compression=compression, processing_parameters={"seed": 1}) as w:
        w.write_file(hits[:10], tracks[:10], list(range(10)))
        w.write_file(hits[10:], tracks[10:], list(range(10, 25)))
    assert is_dataset(tmp_path / "ds") and not (tmp_path / "ds.partial").exists()
    reader = DatasetReader(tmp_path / "ds")
    assert len(reader) == 25 and reader.hit_features == list(HIT_FEATURES)
    for i in (0, 9, 10, 24):
        event = reader.read(i)
        np.testing.assert_array_equal(event.hits, hits[i])
        np.testing.assert_array_equal(event.tracks, tracks[i])
        assert event.event_number == i
    np.testing.assert_array_equal(reader.num_hits(), [len(h) for h in hits])
    with h5py.File(tmp_path / "ds/data/events_0000.h5") as f:
        assert f["hits"].dtype == np.float32 and f["num_hits"].dtype == np.int16
        assert np.isnan(f["hits"][0, len(hits[0]) :]).all()  # NaN padding on disk
        assert (f["hits"].compression == "gzip") == (compression == "gzip")


def test_writer_leaves_nothing_on_failure(tmp_path):
    hits, tracks = random_events(3)
    with pytest.raises(RuntimeError), DatasetWriter(tmp_path / "ds") as w:
        w.write_file(hits, tracks, [0, 1, 2])
        raise RuntimeError("interrupted")
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()


def test_reads_reference_layout_with_shuffled_columns(tmp_path):
    hits, tracks = random_events(12, seed=2)
    rng = np.random.default_rng(0)
    hit_cols = [HIT_FEATURES[i] for i in rng.permutation(len(HIT_FEATURES))]
    track_cols = [TRACK_FEATURES[i] for i in (2, 0, 3, 1)]
    path = write_reference_dataset(
        tmp_path / "ref", hits, tracks, hit_columns=hit_cols, track_columns=track_cols, files=3, max_hits=64
    )
    reader = DatasetReader(path)
    assert reader.hit_features == hit_cols
    for i in range(12):
        event = reader.read(i)
        assert event.hits.shape == (len(hits[i]), 20) and not np.isnan(event.hits).any()
        for name in ("spacePoint_truthLink", "spacePoint_globEdgeLowZ", "spacePoint_driftR"):
            np.testing.assert_array_equal(
                event.hits[:, reader.hit_index[name]], hits[i][:, HIT_FEATURES.index(name)]
            )
        np.testing.assert_array_equal(
            event.tracks[:, reader.track_index["truthMuon_pt"]],
            tracks[i][:, TRACK_FEATURES.index("truthMuon_pt")],
        )
        assert event.event_number == 1000 + i


def _edit_metadata(path, **changes):
    meta = yaml.safe_load((path / "metadata.yaml").read_text())
    meta.update(changes)
    (path / "metadata.yaml").write_text(yaml.safe_dump(meta))


def test_missing_required_column_names_metadata_and_column(reference_dataset):
    path, _, _ = reference_dataset
    cols = list(HIT_FEATURES)
    cols[cols.index("spacePoint_truthLink")] = "spacePoint_something"
    _edit_metadata(path, hit_features=cols)
    with pytest.raises(DataFormatError, match=r"metadata\.yaml.*spacePoint_truthLink"):
        DatasetReader(path)
    with pytest.raises(DataFormatError, match=r"truthMuon_eta"):
        _edit_metadata(path, hit_features=list(HIT_FEATURES), track_features=["truthMuon_pt", "x", "y", "z"])
        DatasetReader(path)


def test_shape_disagreeing_with_metadata_names_file(reference_dataset):
    path, _, _ = reference_dataset
    _edit_metadata(path, hit_features=[*HIT_FEATURES, "extra_column"])
    reader = DatasetReader(path)
    with pytest.raises(DataFormatError, match=r"chunk_0\.h5: hits has shape .*21"):
        reader.read(0)


@pytest.mark.parametrize("bad", ["past_last", "fraction", "nan"])
def test_truth_link_out_of_range_names_file_and_row(tmp_path, bad):
    hits, tracks = random_events(6, seed=3)
    value = {"past_last": len(tracks[4]), "fraction": 0.5, "nan": np.nan}[bad]
    hits[4][2, HIT_FEATURES.index("spacePoint_truthLink")] = value  # no muon's index
    path = write_reference_dataset(tmp_path / "ref", hits, tracks, files=2)
    reader = DatasetReader(path)
    reader.read(3)
    with pytest.raises(
        DataFormatError, match=r"chunk_1\.h5: event row 1 .*truthLink value .* outside -1\.\."
    ):
        reader.read(4)


def test_more_tracks_than_configured_names_file_and_row(tmp_path):
    hits, tracks = random_events(4, seed=4, max_tracks=2)
    tracks[2] = np.concatenate([tracks[2], tracks[2]])[:2]
    path = write_reference_dataset(tmp_path / "ref", hits, tracks)
    reader = DatasetReader(path, max_tracks=1)
    with pytest.raises(
        DataFormatError, match=r"chunk_0\.h5: event row 2 .*2 tracks, more than the configured maximum 1"
    ):
        reader.read(2)


def test_non_finite_track_value_is_an_error(tmp_path):
    hits, tracks = random_events(2, seed=5)
    tracks[1][0, 1] = np.nan
    reader = DatasetReader(write_reference_dataset(tmp_path / "ref", hits, tracks))
    with pytest.raises(DataFormatError, match=r"event row 1 .*non-finite truthMuon_eta"):
        reader.read(1)


def test_not_a_dataset_and_missing_files(tmp_path, reference_dataset):
    with pytest.raises(DataFormatError, match=r"missing metadata\.yaml"):
        DatasetReader(tmp_path)
    with pytest.raises(DataFormatError, match="not a directory"):
        DatasetReader(tmp_path / "nowhere")
    path, _, _ = reference_dataset
    (path / "data/chunk_1.h5").unlink()
    with pytest.raises(DataFormatError, match=r"data/chunk_1\.h5 not found"):
        DatasetReader(path)


def test_reading_one_event_does_not_load_the_file(tmp_path):
    """Constant memory: one event costs one block of rows (here 256 of 2000), not the 96 MB file."""
    hits, tracks = random_events(2000, seed=6)
    path = write_reference_dataset(tmp_path / "big", hits, tracks, max_hits=600, compression=None)
    reader = DatasetReader(path)
    reader.read(0)  # open the file once
    tracemalloc.start()
    reader.read(1321)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    file_bytes = 2000 * 600 * 20 * 4
    assert peak < 2_000_000 < file_bytes / 40


def test_reader_pickles_without_handles(reference_dataset):
    path, hits, _ = reference_dataset
    reader = DatasetReader(path)
    reader.read(0)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._handles == {}
    np.testing.assert_array_equal(clone.read(20).hits, hits[20])

"""ATLAS hit-dump ROOT files -> the hepattn layout: cuts, relabelling, bad files, pile-up simulation."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import awkward as ak
import h5py
import numpy as np
import pytest
import uproot
import yaml

from muonreg import detector as det
from muonreg.data.format import DatasetReader, is_dataset
from muonreg.data.pileup import HITS_PER_MU, REFERENCE_HITS_PER_EVENT_PU200, background_hits
from muonreg.data.root_prepare import Cuts, RootFileError, prepare_root
from muonreg.data.schema import HIT_FEATURES, Technology
from muonreg.data.simulate import readout_id
from muonreg.data.simulate_root import write_simulated_root
from muonreg.prepare import main as prepare_main

COL = {name: i for i, name in enumerate(HIT_FEATURES)}
MDT, RPC = int(Technology.MDT), int(Technology.RPC)

# The dump's element types, written here with plain uproot (not muonreg's writer).
HIT_TYPES = {name: np.float32 for name in HIT_FEATURES} | {
    "spacePoint_readOutSide": np.int8,
    "spacePoint_channel": np.uint16,
    "spacePoint_layer": np.uint8,
    "spacePoint_stationPhi": np.uint8,
    "spacePoint_stationEta": np.int8,
    "spacePoint_stationIndex": np.uint8,
    "spacePoint_technology": np.uint8,
    "spacePoint_truthLink": np.int8,
}

# Hand-made events: hits as (technology, truthLink), muons as (pt, eta, phi, q), eventNumber.
EVENTS = [
    # muon 0 passes; muon 1 is below 5 GeV; muon 2 has no hit at all (not a muon of the event)
    (
        [(MDT, 0)] * 4 + [(MDT, 1)] * 4 + [(MDT, -1)] * 2,
        [(20, 0.5, 0.1, 1), (3, 0.2, 1.0, -1), (10, 0, 0, 1)],
        100,
    ),
    # muon 0 has 2 hits (< 3): dropped, muon 1 becomes muon 0
    ([(MDT, 0)] * 2 + [(MDT, 1)] * 3 + [(MDT, -1)], [(30, 1.0, 2.0, 1), (40, -1.2, -2.0, -1)], 101),
    # the only muon has |eta| 2.9 > 2.7: the event is left without a muon
    ([(MDT, 0)] * 3 + [(MDT, -1)], [(50, 2.9, 0.0, 1)], 102),
    # muon 0 lives mostly in the RPC (3 RPC + 1 MDT hits); muon 1 passes
    ([(RPC, 0)] * 3 + [(MDT, 0)] + [(MDT, 1)] * 4, [(25, 0.3, 0.5, -1), (15, -0.4, -0.5, 1)], 103),
    # RPC background only
    ([(RPC, -1)] * 2, [], 104),
]


def _hit_columns(hits: list[tuple[int, int]], entry: int) -> np.ndarray:
    """[n, 20] rows in HIT_FEATURES order; the time 1000 * entry + i names each hit."""
    rows = np.zeros((len(hits), len(HIT_FEATURES)))
    for i, (technology, link) in enumerate(hits):
        rows[i, :6] = (7000 + i, 100.0, 500.0, 7000 + i, -100.0, 500.0)
        rows[i, COL["spacePoint_time"]] = 1000 * entry + i
        rows[i, COL["spacePoint_driftR"]] = 3.0 if technology == MDT else 0.0
        rows[i, COL["spacePoint_readOutSide"]] = 1
        rows[i, COL["spacePoint_covXX"]] = rows[i, COL["spacePoint_covYY"]] = 0.01
        rows[i, COL["spacePoint_channel"]] = i + 1
        rows[i, COL["spacePoint_layer"]] = 1
        rows[i, COL["spacePoint_stationPhi"]] = 3
        rows[i, COL["spacePoint_stationEta"]] = -2
        rows[i, COL["spacePoint_stationIndex"]] = 1
        rows[i, COL["spacePoint_technology"]] = technology
        rows[i, COL["spacePoint_truthLink"]] = link
    return rows


def write_dump(
    path: Path, events=EVENTS, drop_branch: str | None = None, short_branch: str | None = None
) -> Path:
    """A hit-dump ROOT file in the ATLAS tree layout, written with plain uproot; a second tree after
    it checks that the first tree is the one read. `drop_branch` is left out, `short_branch` is
    written on its own with the last hit of entry 0 missing."""
    rows = [_hit_columns(hits, e) for e, (hits, _, _) in enumerate(events)]
    counts = [len(r) for r in rows]
    flat = np.concatenate(rows)
    hit_fields = {
        name.removeprefix("spacePoint_"): ak.unflatten(flat[:, COL[name]].astype(HIT_TYPES[name]), counts)
        for name in HIT_FEATURES
        if name not in (drop_branch, short_branch)
    }
    muons = [np.array(m, dtype=np.float64).reshape(-1, 4) for _, m, _ in events]
    mu = np.concatenate(muons)
    mu_counts = [len(m) for m in muons]
    muon_fields = {
        field: ak.unflatten(mu[:, i].astype(np.int32 if field == "q" else np.float32), mu_counts)
        for i, field in enumerate(("pt", "eta", "phi", "q"))
    }
    data = {
        "spacePoint": ak.zip(hit_fields),
        "truthMuon": ak.zip(muon_fields),
        "eventNumber": np.array([n for _, _, n in events], dtype=np.uint64),
    }
    if short_branch is not None:
        values = ak.unflatten(flat[:, COL[short_branch]].astype(HIT_TYPES[short_branch]), counts)
        data[short_branch] = ak.concatenate([values[:1, :-1], values[1:]])
    with uproot.recreate(path) as f:
        f.mktree("MuonHitDump", {k: v.type if isinstance(v, ak.Array) else v.dtype for k, v in data.items()})
        f["MuonHitDump"].extend(data)
        f["OtherTree"] = {"x": np.arange(3.0)}
    return path


def _metadata(path: Path) -> dict:
    return yaml.safe_load((path / "metadata.yaml").read_text())


@pytest.fixture
def dump_dir(tmp_path) -> Path:
    (tmp_path / "in").mkdir()
    write_dump(tmp_path / "in" / "run1.root")
    return tmp_path / "in"


def test_cuts_relabel_failing_muons_and_renumber_the_rest(dump_dir, tmp_path):
    out = prepare_root(dump_dir, tmp_path / "ds", Cuts(no_rpc=True), progress=False)
    reader = DatasetReader(out)
    events = [reader.read(i) for i in range(len(reader))]
    assert [e.event_number for e in events] == [100, 101, 103]
    link, clock = COL["spacePoint_truthLink"], COL["spacePoint_time"]
    # every hit kept in its order (times name them), RPC hits removed, links relabelled/renumbered
    np.testing.assert_array_equal(events[0].hits[:, clock], np.arange(10))
    np.testing.assert_array_equal(events[0].hits[:, link], [0] * 4 + [-1] * 6)
    np.testing.assert_array_equal(events[1].hits[:, clock], 1000 + np.arange(6))
    np.testing.assert_array_equal(events[1].hits[:, link], [-1, -1, 0, 0, 0, -1])
    np.testing.assert_array_equal(events[2].hits[:, clock], 3000 + np.arange(3, 8))
    np.testing.assert_array_equal(events[2].hits[:, link], [-1, 0, 0, 0, 0])
    assert events[2].hits[:, COL["spacePoint_technology"]].tolist() == [MDT] * 5
    np.testing.assert_allclose(events[0].tracks, [[20, 0.5, 0.1, 1]], rtol=1e-6)
    np.testing.assert_allclose(events[1].tracks, [[40, -1.2, -2.0, -1]], rtol=1e-6)
    np.testing.assert_allclose(events[2].tracks, [[15, -0.4, -0.5, 1]], rtol=1e-6)
    np.testing.assert_array_equal(events[0].hits[:, COL["spacePoint_stationEta"]], -2)  # int8 sign kept

    meta = _metadata(out)
    assert meta["processing_parameters"] == {
        "pt_threshold": 5.0,
        "eta_threshold": 2.7,
        "num_hits_threshold": 3,
        "no_NSW": False,
        "no_rpc": True,
    }
    assert meta["event_mapping"]["chunk_summary"] == [
        {
            "h5_file": "data/run1_0000.h5",
            "source_root_file": str(dump_dir / "run1.root"),
            "event_count": 3,
            "worker_id": 0,
        }
    ]
    summary = meta["processing_summary"]
    assert summary["events_seen"] == 5 and summary["events_kept"] == 3
    assert summary["events_dropped"] == {"no_hits": 1, "no_muon": 1}
    assert (summary["muons_seen"], summary["muons_kept"], summary["muons_dropped"]) == (7, 3, 4)
    assert summary["muons_failing"] == {"pt": 1, "eta": 1, "num_hits": 2}
    assert summary["hits_kept"] == 21 and summary["files_skipped"] == []


def test_a_file_is_prepared_in_blocks_of_entries_with_the_same_events(dump_dir, tmp_path):
    whole = DatasetReader(prepare_root(dump_dir, tmp_path / "whole", progress=False))
    blocks = DatasetReader(prepare_root(dump_dir, tmp_path / "blocks", events_per_file=2, progress=False))
    # entries 0-1 give two events, 2-3 one (102 fails), 4 none: no file for the last block
    assert [(c["h5_file"], c["event_count"]) for c in blocks.chunks] == [
        ("data/run1_0000.h5", 2),
        ("data/run1_0001.h5", 1),
    ]
    assert len(blocks) == len(whole) == 3
    for i in range(3):
        np.testing.assert_array_equal(blocks.read(i).hits, whole.read(i).hits)
        np.testing.assert_array_equal(blocks.read(i).tracks, whole.read(i).tracks)
    assert (
        _metadata(tmp_path / "blocks")["processing_summary"]
        == _metadata(tmp_path / "whole")["processing_summary"]
    )


def test_rpc_hits_count_for_their_muon_unless_rpc_is_removed(dump_dir, tmp_path):
    out = prepare_root(dump_dir, tmp_path / "ds", progress=False)
    reader = DatasetReader(out)
    assert [reader.read(i).event_number for i in range(len(reader))] == [100, 101, 103]
    third = reader.read(2)
    np.testing.assert_array_equal(third.hits[:, COL["spacePoint_truthLink"]], [0, 0, 0, 0, 1, 1, 1, 1])
    summary = _metadata(out)["processing_summary"]
    assert summary["events_dropped"] == {"no_hits": 0, "no_muon": 2}
    assert summary["muons_kept"] == 4 and summary["muons_failing"] == {"pt": 1, "eta": 1, "num_hits": 1}


def test_no_nsw_removes_stgc_and_mm_hits_before_the_hit_count_cut(tmp_path):
    stgc, mm = int(Technology.STGC), int(Technology.MM)
    event = ([(stgc, 0), (mm, 0), (MDT, 0), (MDT, 0), (MDT, 0), (mm, -1), (MDT, -1)], [(12, 2.0, 0.3, 1)], 9)
    (tmp_path / "in").mkdir()
    write_dump(tmp_path / "in" / "nsw.root", [event])
    kept = DatasetReader(
        prepare_root(tmp_path / "in", tmp_path / "a", Cuts(no_NSW=True), progress=False)
    ).read(0)
    np.testing.assert_array_equal(kept.hits[:, COL["spacePoint_time"]], [2, 3, 4, 6])
    np.testing.assert_array_equal(kept.hits[:, COL["spacePoint_truthLink"]], [0, 0, 0, -1])
    with pytest.raises(Exception, match="no event passed the cuts"):
        prepare_root(tmp_path / "in", tmp_path / "b", Cuts(num_hits_threshold=4, no_NSW=True), progress=False)
    assert not (tmp_path / "b").exists()
    assert (
        len(
            DatasetReader(
                prepare_root(tmp_path / "in", tmp_path / "c", Cuts(num_hits_threshold=4), progress=False)
            )
        )
        == 1
    )


def test_cut_thresholds_and_compression_are_options(dump_dir, tmp_path, capsys):
    out = tmp_path / "ds"
    prepare_main(
        ["root", "--input", str(dump_dir), "--output", str(out), "--pt-threshold", "2", "--uncompressed"]
    )
    assert capsys.readouterr().out.strip() == str(out)
    summary = _metadata(out)["processing_summary"]
    assert summary["muons_failing"]["pt"] == 0 and summary["muons_kept"] == 5
    with h5py.File(out / "data" / "run1_0000.h5") as f:
        assert f["hits"].compression is None and f["hits"].chunks[0] == 1
    with h5py.File(prepare_root(dump_dir, tmp_path / "gz", progress=False) / "data" / "run1_0000.h5") as f:
        assert f["hits"].compression == "gzip"


def _broken_copy(good: Path, name: str) -> Path:
    data = good.read_bytes()
    broken = good.with_name(name)
    broken.write_bytes(data[: len(data) // 2])  # truncated mid-file, as an interrupted copy leaves it
    return broken


def test_unreadable_file_stops_the_run_naming_it_and_leaves_no_dataset(dump_dir, tmp_path, capsys):
    _broken_copy(dump_dir / "run1.root", "run2_broken.root")
    out = tmp_path / "ds"
    with pytest.raises(RootFileError, match=r"run2_broken\.root: cannot be read"):
        prepare_root(dump_dir, out, progress=False)
    assert not out.exists() and not (tmp_path / "ds.partial").exists()
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["root", "--input", str(dump_dir), "--output", str(out)])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "run2_broken.root" in message and "\n" not in message
    assert not out.exists()


def test_unreadable_file_is_skipped_and_recorded_on_request(dump_dir, tmp_path):
    broken = _broken_copy(dump_dir / "run1.root", "run0_broken.root")
    (dump_dir / "notes.txt").write_text("not a ROOT file, not looked at")
    out = prepare_root(dump_dir, tmp_path / "ds", on_error="skip", progress=False)
    meta = _metadata(out)
    summary = meta["processing_summary"]
    assert (summary["files_seen"], summary["files_prepared"]) == (2, 1)
    assert [s["file"] for s in summary["files_skipped"]] == [str(broken)]
    assert "cannot be read" in summary["files_skipped"][0]["error"]
    assert [c["source_root_file"] for c in meta["event_mapping"]["chunk_summary"]] == [
        str(dump_dir / "run1.root")
    ]
    assert len(DatasetReader(out)) == 3


def test_skipped_files_are_named_with_their_count_at_the_end(dump_dir, tmp_path, capsys):
    broken = _broken_copy(dump_dir / "run1.root", "run0_broken.root")
    out = tmp_path / "ds"
    prepare_main(["root", "--input", str(dump_dir), "--output", str(out), "--on-error", "skip"])
    stdout, stderr = capsys.readouterr()
    assert stdout.strip() == str(out)
    lines = stderr.strip().splitlines()[-2:]
    assert lines[0] == (
        f"skipped 1 of 2 ROOT files (--on-error skip; also in {out / 'metadata.yaml'}, "
        "processing_summary.files_skipped):"
    )
    assert lines[1].startswith(f"  {broken}: ") and "cannot be read" in lines[1]


def test_missing_branch_and_impossible_truth_link_name_file_and_problem(tmp_path):
    (tmp_path / "a").mkdir()
    write_dump(tmp_path / "a" / "old.root", drop_branch="spacePoint_covYY")
    with pytest.raises(RootFileError, match=r"old\.root: tree MuonHitDump has no branch spacePoint_covYY"):
        prepare_root(tmp_path / "a", tmp_path / "ds", progress=False)
    (tmp_path / "c").mkdir()
    write_dump(tmp_path / "c" / "odd.root", short_branch="spacePoint_driftR")
    with pytest.raises(
        RootFileError, match=r"odd\.root: entry 0: branch spacePoint_driftR has a different length"
    ):
        prepare_root(tmp_path / "c", tmp_path / "ds", progress=False)
    (tmp_path / "b").mkdir()
    good = ([(MDT, 0)] * 3, [(20, 0, 0, 1)], 6)
    write_dump(tmp_path / "b" / "bad.root", [good, good, ([(MDT, 0), (MDT, 2)], [(20, 0, 0, 1)], 7)])
    with pytest.raises(
        RootFileError, match=r"bad\.root: entry 2: spacePoint_truthLink=2 but the entry has 1"
    ):
        prepare_root(tmp_path / "b", tmp_path / "ds", events_per_file=2, progress=False)
    with pytest.raises(Exception, match=r"no \*\.root files"):
        prepare_root(tmp_path, tmp_path / "ds", progress=False)


def test_pileup_background_scales_with_mu_and_follows_the_simulator_read_out():
    rng = np.random.default_rng(3)
    rows, event = background_hits(rng, 200, 50.0)
    assert abs(len(rows) / 200 / (50 * HITS_PER_MU) - 1) < 0.02
    assert np.bincount(event, minlength=200).min() > 0
    assert (rows[:, COL["spacePoint_truthLink"]] == -1).all()
    tech = rows[:, COL["spacePoint_technology"]]
    assert set(np.unique(tech)) == {Technology.MDT, Technology.RPC, Technology.TGC}
    assert 0.15 < (tech != Technology.MDT).mean() < 0.25
    mdt = rows[tech == Technology.MDT]
    centre = [
        (mdt[:, COL[f"spacePoint_globEdgeHigh{c}"]] + mdt[:, COL[f"spacePoint_globEdgeLow{c}"]]) / 2
        for c in "XYZ"
    ]
    t0 = det.time_of_flight(*centre)
    np.testing.assert_allclose(
        mdt[:, COL["spacePoint_driftR"]], det.drift_radius(mdt[:, COL["spacePoint_time"]] - t0)
    )
    assert (rows[tech != Technology.MDT, COL["spacePoint_driftR"]] == 0).all()
    assert len(background_hits(np.random.default_rng(3), 200, 0.0)[0]) == 0


@pytest.mark.slow
def test_simulated_pileup_root_prepares_into_a_readable_filter_dataset(tmp_path):
    """The whole path: muonreg-simulate --format root --pileup 200, then muonreg-prepare root."""
    from muonreg.data.simulate_cli import main as simulate_main

    simulate_main(
        [
            "--format",
            "root",
            "--events",
            "24",
            "--files",
            "2",
            "--pileup",
            "200",
            "--out",
            str(tmp_path / "root"),
        ]
    )
    files = sorted((tmp_path / "root").glob("*.root"))
    assert [f.name for f in files] == ["simulated_0000.root", "simulated_0001.root"]
    with uproot.open(files[0]) as f:
        tree = f["MuonHitDump"]
        assert tree.num_entries == 12
        assert tree["spacePoint_technology"].typename == "uint8_t[]"
        assert tree["spacePoint_truthLink"].typename == "int8_t[]"
        assert tree["truthMuon_pt"].typename == "float[]" and tree["eventNumber"].typename == "uint64_t"

    one = prepare_root(tmp_path / "root", tmp_path / "one", progress=False)
    two = prepare_root(tmp_path / "root", tmp_path / "two", workers=2, progress=False)
    reader = DatasetReader(two)
    assert len(reader) == 24 and [c["source_root_file"] for c in reader.chunks] == [str(f) for f in files]
    assert sorted(c["worker_id"] for c in reader.chunks) == [0, 1]
    hits_per_event = reader.num_hits()
    assert 0.95 < hits_per_event.mean() / REFERENCE_HITS_PER_EVENT_PU200 < 1.05
    other = DatasetReader(one)
    for i in range(len(reader)):
        event = reader.read(i)  # the reader checks every truth link against the event's tracks
        np.testing.assert_array_equal(event.hits, other.read(i).hits)
        assert event.event_number == i and 1 <= len(event.tracks) <= 2
        assert len(np.unique(readout_id(event.hits, np.zeros(len(event.hits), np.int64)))) == len(event.hits)
        assert 0.97 < (event.hits[:, COL["spacePoint_truthLink"]] < 0).mean() < 0.999
    summary = _metadata(two)["processing_summary"]
    assert summary["events_kept"] == 24 and summary["hits_kept"] == hits_per_event.sum()


@pytest.mark.slow
def test_killed_prepare_leaves_no_dataset_and_the_rerun_completes(tmp_path):
    write_simulated_root(tmp_path / "root", 48, seed=4, files=8, pileup=200, progress=False)
    out = tmp_path / "ds"
    command = [
        sys.executable,
        "-m",
        "muonreg.prepare",
        "root",
        "--input",
        str(tmp_path / "root"),
        "--output",
        str(out),
    ]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial_data = tmp_path / "ds.partial" / "data"
    deadline = time.monotonic() + 60
    while not (partial_data.is_dir() and any(partial_data.glob("*.h5"))):
        assert process.poll() is None, "prepare finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists() and not is_dataset(out)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert is_dataset(out) and len(DatasetReader(out)) == 48 and not (tmp_path / "ds.partial").exists()


def test_simulate_command_keeps_hdf5_as_its_default_and_writes_filter_datasets_with_pileup(tmp_path, capsys):
    from muonreg.data.simulate_cli import main as simulate_main

    simulate_main(["--events", "5", "--out", str(tmp_path / "h5")])
    assert is_dataset(tmp_path / "h5") and len(DatasetReader(tmp_path / "h5")) == 5
    simulate_main(["--events", "6", "--out", str(tmp_path / "pu"), "--pileup", "20", "--uncompressed"])
    reader = DatasetReader(tmp_path / "pu")
    assert 0 < len(reader) <= 6 and reader.num_hits().mean() > 20 * HITS_PER_MU * 0.8
    assert _metadata(tmp_path / "pu")["processing_parameters"]["pileup"] == 20
    with pytest.raises(SystemExit):
        simulate_main(["--events", "5", "--out", str(tmp_path / "x"), "--pileup", "-1"])
    assert (
        "--pileup -1: the mean pile-up must be >= 0" in capsys.readouterr().err
        and not (tmp_path / "x").exists()
    )


def test_a_file_failing_part_way_leaves_none_of_its_blocks_when_skipped(dump_dir, tmp_path):
    good = ([(MDT, 0)] * 3, [(20, 0, 0, 1)], 6)
    write_dump(dump_dir / "late.root", [good, good, ([(MDT, 0), (MDT, 2)], [(20, 0, 0, 1)], 7)])
    out = prepare_root(dump_dir, tmp_path / "ds", on_error="skip", events_per_file=2, progress=False)
    assert sorted(p.name for p in (out / "data").iterdir()) == ["run1_0000.h5", "run1_0001.h5"]
    skipped = _metadata(out)["processing_summary"]["files_skipped"]
    assert [s["file"] for s in skipped] == [str(dump_dir / "late.root")] and "entry 2" in skipped[0]["error"]

"""The pile-up hit filter's pieces on hand-made events: the sector frame and its windows, the pair
geometry the filter learns from, the classical road search, the muon-loss count; and the pile-up
dataset written straight to HDF5 equal to the ROOT dump prepared by `muonreg-prepare root`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from muonreg.data.format import DatasetReader
from muonreg.data.geometry import GEOMETRY, G
from muonreg.data.pileup import write_pileup_dataset
from muonreg.data.root_prepare import prepare_root
from muonreg.data.simulate_root import write_simulated_root
from muonreg.evaluation.filter_metrics import muons_lost
from muonreg.models import HitFilter
from muonreg.models.neighbourhood import neighbour_edges
from muonreg.reco.road_search import road_layers
from muonreg.reco.sector_frame import detector_order, hit_frame, windows


def _geometry(hits: list[tuple[float, float, int, bool, float]]) -> torch.Tensor:
    """[1, n, len(GEOMETRY)] of barrel hits (normal m, z m, sector, tube, time residual ns)."""
    g = torch.zeros(1, len(hits), len(GEOMETRY))
    for i, (normal, z, sector, tube, time) in enumerate(hits):
        phi_s = sector * 2 * math.pi / 16
        g[0, i, G["normal"]], g[0, i, G["z"]] = normal, z
        g[0, i, G["cos_phi_s"]], g[0, i, G["sin_phi_s"]] = math.cos(phi_s), math.sin(phi_s)
        g[0, i, G["barrel"]], g[0, i, G["mdt"]], g[0, i, G["time_residual"]] = 1.0, float(tube), time
    return g


def test_windows_are_the_neighbours_in_order_with_zeros_past_the_ends():
    x = torch.arange(1, 6.0).reshape(1, 5)
    w = windows(x, 2)
    assert w.shape == (1, 5, 5)
    assert w[0, 0].tolist() == [0, 0, 1, 2, 3] and w[0, 4].tolist() == [3, 4, 5, 0, 0]
    assert windows(x.unsqueeze(-1).expand(1, 5, 3), 1)[0, 2].tolist() == [[2] * 3, [3] * 3, [4] * 3]


def test_hits_are_ordered_by_sector_then_pointing_angle_with_padding_last():
    # sector 3 at 45 degrees, sector 0 at 60 and 30 degrees, then padding
    g = _geometry([(7.0, 7.0, 3, True, 0.0), (7.0, 7.0 / math.tan(math.pi / 3), 0, True, 0.0),
                   (7.0, 7.0 / math.tan(math.pi / 6), 0, True, 0.0), (1.0, 1.0, 0, True, 0.0)])  # fmt: skip
    valid = torch.tensor([[True, True, True, False]])
    frame = hit_frame(g, valid)
    assert frame["sector"].tolist() == [[3, 0, 0, -1]]
    torch.testing.assert_close(frame["angle"][0, :3], torch.tensor([math.pi / 4, math.pi / 3, math.pi / 6]))
    assert detector_order(frame, valid).tolist() == [[2, 1, 0, 3]]


def test_pair_geometry_of_a_tube_and_a_strip():
    # a tube at 45 degrees and 7 m; a strip 2 mrad further at 7.4 m, 10 ns late; another sector's tube
    angle = math.pi / 4 + 0.002
    g = _geometry(
        [(7.0, 7.0, 0, True, 300.0), (7.4, 7.4 / math.tan(angle), 0, False, 10.0), (7.0, 7.0, 1, True, 0.0)]
    )
    valid = torch.ones(1, 3, dtype=torch.bool)
    frame = hit_frame(g, valid)
    order = detector_order(frame, valid)
    assert order.tolist() == [[0, 1, 2]]
    sorted_frame = {k: v.gather(1, order) for k, v in frame.items()}
    edges, mask = neighbour_edges(sorted_frame, valid, 1)
    assert mask[0].tolist() == [[False, False, True], [True, False, False], [False, False, False]]
    tube_sees_strip, strip_sees_tube = edges[0, 0, 2], edges[0, 1, 0]
    torch.testing.assert_close(tube_sees_strip[0], torch.tensor(0.2), atol=1e-4, rtol=0)  # +2 mrad / 10 mrad
    torch.testing.assert_close(strip_sees_tube[0], torch.tensor(-0.2), atol=1e-4, rtol=0)
    torch.testing.assert_close(tube_sees_strip[1], torch.tensor(math.exp(-1.0)), atol=1e-3, rtol=0)
    torch.testing.assert_close(tube_sees_strip[2], torch.tensor(0.4), atol=1e-5, rtol=0)  # depth 7.4 - 7.0 m
    assert tube_sees_strip[3] == 0 and tube_sees_strip[4] == 0  # not one layer; the neighbour is a strip
    torch.testing.assert_close(tube_sees_strip[5], torch.tensor(0.4))  # the strip's residual: 10 / 25 ns
    assert strip_sees_tube[5] == 0 and strip_sees_tube[6] == 0  # a tube's time is not a strip's


def test_road_search_finds_a_straight_segment_among_random_tubes():
    # a muon's segment: 6 tube layers of one chamber on one pointing line (theta = 1.1 rad), and
    # lone random tubes, each on a road of its own, one of them in another sector on the same line
    theta = 1.1
    segment = [(7.0 + 0.026 * i, (7.0 + 0.026 * i) / math.tan(theta), 5, True, 0.0) for i in range(6)]
    lone = [(7.0 + 0.026 * (i % 6), 7.0 / math.tan(0.3 + 0.05 * i), 5, True, 0.0) for i in range(14)]
    other_sector = [(7.0, 7.0 / math.tan(theta), 6, True, 0.0)]
    hits = lone[:7] + segment + lone[7:] + other_sector
    valid = torch.ones(1, len(hits), dtype=torch.bool)
    layers = road_layers(_geometry(hits), valid)[0].tolist()
    assert layers[7:13] == [6] * 6  # every segment hit sees the 6 layers of its segment
    assert layers[:7] + layers[13:] == [1] * 15  # the random tubes see only themselves
    padded = torch.cat([valid, torch.zeros(1, 2, dtype=torch.bool)], 1)
    assert road_layers(torch.cat([_geometry(hits), torch.zeros(1, 2, len(GEOMETRY))], 1), padded)[
        0, -2:
    ].tolist() == [0, 0]


def test_muons_lost_counts_muons_left_with_fewer_than_three_hits():
    ids = np.array([-1, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, -1])
    kept = np.array([1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1], bool)
    assert muons_lost(ids, kept) == pytest.approx(1 / 3)  # muon 0 keeps 2 hits
    assert muons_lost(ids, np.ones(12, bool)) == 0 and math.isnan(
        muons_lost(np.full(3, -1), np.ones(3, bool))
    )


def test_filter_cuts_are_stored_with_its_weights():
    model = HitFilter(4, dim=8, layers=1, neighbours=2, working_points=(0.99, 0.995))
    assert model.stored_cuts() == {}
    model.set_cuts({0.99: 0.3, 0.995: 0.1})
    again = HitFilter(4, dim=8, layers=1, neighbours=2, working_points=(0.99, 0.995))
    again.load_state_dict(model.state_dict())
    assert again.stored_cuts() == {0.99: 0.3, 0.995: 0.1}
    with pytest.raises(ValueError, match=r"no cut given for working point\(s\) \[0.995\]"):
        model.set_cuts({0.99: 0.2})


def _events(path) -> list[tuple[int, np.ndarray, np.ndarray]]:
    reader = DatasetReader(path)
    return [(e.event_number, e.hits, e.tracks) for e in map(reader.read, range(len(reader)))]


@pytest.mark.parametrize("rntuple", [False, True], ids=["TTree", "RNTuple"])
def test_pileup_dataset_holds_the_events_of_the_prepared_root_dump(tmp_path, rntuple):
    direct = write_pileup_dataset(tmp_path / "direct", 30, seed=4, files=2, pileup=5.0, progress=False)
    write_simulated_root(
        tmp_path / "ntuples", 30, seed=4, files=2, pileup=5.0, progress=False, rntuple=rntuple
    )
    prepared = prepare_root(tmp_path / "ntuples", tmp_path / "prepared", progress=False)
    ours, theirs = _events(direct), _events(prepared)
    assert 20 < len(ours) == len(theirs)
    for (n1, h1, t1), (n2, h2, t2) in zip(ours, theirs, strict=True):
        assert n1 == n2
        np.testing.assert_array_equal(h1, h2)
        np.testing.assert_array_equal(t1, t2)
    links = np.concatenate([h[:, 19] for _, h, _ in ours])
    assert 0 < (links >= 0).mean() < 0.6  # muon hits among the pile-up

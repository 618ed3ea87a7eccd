"""The classical hit filter beside the learned one: a road search from the interaction point.

As the ATLAS muon pattern recognition does before any fit, look for roads: a muon from the vertex
leaves hits in many detector layers (tube layers, trigger gas gaps) along a narrow road in pointing
angle within its phi sector (muonreg.reco.sector_frame), a pile-up hit lies on a road of its own.
A hit's score is the number of distinct layers with a hit in its road, |pointing angle - its own|
<= `width`, itself included; its natural working points are "at least n layers". No training: the
width is a physics choice (a 5 GeV muon's hits spread over ~10 mrad of pointing angle); on the
validation split of data=pileup, 3 / 5 / 7 / 10 mrad keep 99 % of the muon hits at a background
rejection of at most ~3 / 8 / 7 / 10 (bench/RESULTS.md, "Hit filter at pile-up 200").
"""

from __future__ import annotations

import torch

from muonreg.reco.sector_frame import detector_order, hit_frame, windows

ROAD_WIDTH = 0.010  # rad
ROAD_HITS = 24  # hits examined on either side of each hit in (sector, pointing angle) order
LAYER_DEPTH = 0.01  # m: hits whose depths round to the same cm are on one layer
WORKING_POINTS = (4, 6, 8, 10)  # at least this many layers in the road


@torch.no_grad()
def road_layers(
    geometry: torch.Tensor, valid: torch.Tensor, width: float = ROAD_WIDTH, k: int = ROAD_HITS
) -> torch.Tensor:
    """Per hit [b, m]: the number of distinct layers hit in its road (0 for padding or hits without
    geometry). geometry [b, m, len(GEOMETRY)]; valid [b, m]: a real hit with its geometry."""
    frame = hit_frame(geometry, valid)
    order = detector_order(frame, valid)
    angle, sector, valid_sorted = (t.gather(1, order) for t in (frame["angle"], frame["sector"], valid))
    layer = (frame["depth"] / LAYER_DEPTH).round().long() * 2 + frame[
        "tube"
    ].long()  # a tube and a strip apart
    layer = layer.gather(1, order)
    in_road = (
        windows(valid_sorted, k)
        & (windows(sector, k) == sector.unsqueeze(-1))
        & ((windows(angle, k) - angle.unsqueeze(-1)).abs() <= width)
        & valid_sorted.unsqueeze(-1)
    )
    keys = torch.where(in_road, windows(layer, k), -1).sort(dim=-1).values
    distinct = (keys[..., :1] >= 0).sum(-1) + ((keys[..., 1:] != keys[..., :-1]) & (keys[..., 1:] >= 0)).sum(
        -1
    )
    return torch.zeros_like(distinct).scatter(1, order, distinct)

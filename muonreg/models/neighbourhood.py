"""Neighbourhoods that follow the detector: how the hit filter sees a muon among thousands of hits.

In (sector, pointing angle) order (muonreg.reco.sector_frame) the `k` hits before and after a hit hold
the rest of a muon's chamber segment and its road through the other stations. Each pair of
neighbours is described in the sector's frame: the difference of pointing angle, of depth along the
chamber normal (a tube layer is one depth), whether the neighbour is a tube, and trigger-strip timing
(a muon's strips fire within a few ns of its time of flight from the vertex, background anywhere in
the read-out window). Layers of learned, geometry-weighted messages between neighbours then find
segments and roads.
"""

from __future__ import annotations

import torch
from torch import nn

from muonreg.models.layers import full_precision, mlp
from muonreg.reco.sector_frame import STRIP_TIME, windows

ANGLE_UNIT = 0.01  # rad: edge angle differences in units of 10 mrad
ANGLE_KERNEL = 0.002  # rad: width of the sharp kernel, about a tube's pitch seen from 10 m
SAME_LAYER = 0.005  # m: two hits this close in depth are on one layer
STRIP_PAIR_TIME = 5.0  # ns: the scale of the time difference of two strips
EDGE_FEATURES = 8
FRAME_FEATURES = 4


def frame_features(frame: dict[str, torch.Tensor]) -> torch.Tensor:
    """The hit's own place in its sector's frame, as inputs [b, m, FRAME_FEATURES]."""
    return torch.stack([frame["angle"], frame["depth"] / 10, frame["tube"], frame["time"]], -1)


def neighbour_edges(
    frame: dict[str, torch.Tensor], hit_valid: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative geometry of each sorted hit and its 2k + 1 window: (edges [b, m, 2k + 1, EDGE_FEATURES],
    mask [b, m, 2k + 1]: a real neighbour in the same sector, not the hit itself)."""
    centre = {name: value.unsqueeze(-1) for name, value in frame.items()}
    near = {name: windows(value, k) for name, value in frame.items()}
    mask = windows(hit_valid, k) & (near["sector"] == centre["sector"]) & hit_valid.unsqueeze(-1)
    mask[..., k] = False
    d_angle = near["angle"] - centre["angle"]
    d_depth = near["depth"] - centre["depth"]
    strip_pair = (1 - near["tube"]) * (1 - centre["tube"])
    edges = torch.stack(
        [
            d_angle / ANGLE_UNIT,
            torch.exp(-d_angle.abs() / ANGLE_KERNEL),
            d_depth,
            (d_depth.abs() < SAME_LAYER).float(),
            near["tube"],
            (1 - near["tube"]) * near["time"],
            strip_pair * ((near["time"] - centre["time"]) * STRIP_TIME / STRIP_PAIR_TIME).clamp(-5.0, 5.0),
            (near["tube"] == centre["tube"]).float(),
        ],
        -1,
    )
    return edges, mask


class NeighbourhoodLayer(nn.Module):
    """Each hit collects narrow messages from its window, each weighted by a learned function of the
    pair's geometry (`kernel` of the embedded pair geometry, zero outside the neighbourhood), and
    updates its state from their sum and maximum: a segment and road finder that is learned
    (aligned hits, their layers, their timing)."""

    def __init__(self, dim: int, edge_dim: int, message_dim: int, dropout: float = 0.0):
        super().__init__()
        # Applied by DetectorNeighbourhoods, for all layers in one product (no bias: zero stays zero).
        self.kernel = nn.Linear(edge_dim, message_dim, bias=False)
        self.message = nn.Linear(dim, message_dim)
        self.update = mlp(dim + 2 * message_dim, dim, dim, dropout=dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """x [b, m, dim] in sorted order; kernel [b, m, 2k + 1, message_dim]: this layer's `kernel` of
        the pair geometry, zero outside the neighbourhood."""
        k = (kernel.shape[2] - 1) // 2
        messages = kernel * windows(self.message(x), k)
        pooled = torch.cat([x, messages.sum(2), messages.amax(2)], -1)
        return self.norm(x + self.update(pooled))


class DetectorNeighbourhoods(nn.Module):
    """Hit states in (sector, pointing angle) order -> `layers` neighbourhood layers over windows of
    `k` hits either side. The pair geometry is embedded once (`edge_dim` wide) and shared by the
    layers."""

    def __init__(
        self, dim: int, layers: int, k: int, edge_dim: int = 16, message_dim: int = 8, dropout: float = 0.0
    ):
        super().__init__()
        self.k = k
        self.edge_net = nn.Linear(EDGE_FEATURES, edge_dim)
        self.layers = nn.ModuleList(
            NeighbourhoodLayer(dim, edge_dim, message_dim, dropout) for _ in range(layers)
        )

    def forward(
        self, x: torch.Tensor, frame: dict[str, torch.Tensor], hit_valid: torch.Tensor
    ) -> torch.Tensor:
        """x [b, m, dim], frame and hit_valid already in sorted order."""
        with full_precision(x):
            edges, mask = neighbour_edges(frame, hit_valid, self.k)
        # Every layer's kernel in one product, masked after it (it has no bias): the pair tensors
        # [b, m, 2k + 1, .] are the bulk of the filter's time at ~7 000 hits per event.
        edge_hidden = torch.relu_(self.edge_net(edges))
        weights = torch.cat([layer.kernel.weight for layer in self.layers])
        kernels = (edge_hidden @ weights.T) * mask.unsqueeze(-1).to(edge_hidden.dtype)
        message_dim = weights.shape[0] // len(self.layers)
        for layer, kernel in zip(self.layers, kernels.split(message_dim, -1), strict=True):
            x = layer(x, kernel)
        return x

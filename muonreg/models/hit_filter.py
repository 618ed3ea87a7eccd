"""The hit filter: a per-hit muon/background classifier for events of thousands of hits.

At HL-LHC pile-up an event holds ~7 000 spectrometer hits of which under 1 % are a muon's; the filter
keeps the likely muon hits so that the tracker sees a few hundred. What tells them apart is geometry
(muonreg.reco.sector_frame, muonreg.models.neighbourhood): a muon lights tubes lined up in every chamber it crosses, on a road
from the vertex, with trigger strips in time; a pile-up hit is a lone tube or strip. So: hit input
net (the tracker's inputs plus the hit's place in its sector's frame), hits sorted by (sector,
pointing angle), `layers` neighbourhood layers over the `neighbours` hits on either side, optionally
windowed attention layers over the same order, and a logit per hit. Label: the hit belongs to a
muon (truthLink >= 0).

`order=phi`, `layers=0`, `attention_layers=3` is the earlier design (attention in windows of hits
sorted by phi), kept for comparison: it learns nothing at pile-up 200 on a CPU budget.
"""

from __future__ import annotations

import torch
from torch import nn

from muonreg.models.encoder import Encoder
from muonreg.models.layers import Standardize, full_precision, mlp
from muonreg.models.neighbourhood import FRAME_FEATURES, DetectorNeighbourhoods, frame_features
from muonreg.numerics import bce_with_logits, masked_mean
from muonreg.reco.sector_frame import detector_order, hit_frame, sort_order

ORDERS = ("detector", "phi")


def muon_hit_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """bool [b, m]: the hit belongs to one of the event's muons (truthLink >= 0)."""
    return batch["particle_hit_valid"].any(dim=1)


class HitFilter(nn.Module):
    """Hits -> input net -> sorted -> neighbourhood layers (+ windowed attention) -> logit per hit."""

    def __init__(
        self,
        input_size: int,
        *,
        dim: int = 32,
        layers: int = 3,
        neighbours: int = 8,
        edge_dim: int = 16,
        message_dim: int = 8,
        order: str = "detector",
        sort_index: int | None = None,
        timing: bool = True,
        attention_layers: int = 0,
        heads: int = 4,
        window: int | None = 128,
        dropout: float = 0.0,
        working_points: tuple[float, ...] = (0.99, 0.995),
    ):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order={order!r} must be one of {list(ORDERS)}")
        if order == "phi" and sort_index is None:
            raise ValueError("order='phi' needs the sort_index of the phi input feature")
        self.order, self.sort_index, self.timing = order, sort_index, timing
        self.input_norm = Standardize(input_size)
        self.input_net = mlp(2 * input_size + FRAME_FEATURES, dim, dim)
        self.neighbourhoods = (
            DetectorNeighbourhoods(dim, layers, neighbours, edge_dim, message_dim, dropout)
            if layers and neighbours
            else None
        )
        self.encoder = (
            Encoder(dim, attention_layers, heads, dropout, window=window) if attention_layers else None
        )
        self.head = mlp(dim, dim, 1)
        # The cut of each working point (a muon-hit efficiency), set on validation data after training
        # (`set_cuts`) and saved with the weights: real data carry no truth to set it on. NaN: not set.
        self.register_buffer("working_points", torch.tensor(working_points, dtype=torch.float64))
        self.register_buffer("cuts", torch.full((len(working_points),), torch.nan, dtype=torch.float64))

    def set_cuts(self, cuts: dict[float, float]) -> None:
        """Store the cut of every working point (probability at or above which a hit is kept)."""
        missing = [wp for wp in self.working_points.tolist() if wp not in cuts]
        if missing:
            raise ValueError(f"no cut given for working point(s) {missing}")
        self.cuts.copy_(torch.tensor([cuts[wp] for wp in self.working_points.tolist()], dtype=torch.float64))

    def stored_cuts(self) -> dict[float, float]:
        """{working point: cut} as set on validation; empty before `set_cuts`."""
        return {
            wp: cut
            for wp, cut in zip(self.working_points.tolist(), self.cuts.tolist(), strict=True)
            if cut == cut
        }

    def _order(self, batch: dict[str, torch.Tensor], frame: dict[str, torch.Tensor]) -> torch.Tensor:
        hit_valid = batch["hit_valid"]
        if self.order == "detector":
            return detector_order(frame, hit_valid)
        return sort_order(batch["hit_x"][..., self.sort_index].float().masked_fill(~hit_valid, torch.inf))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`hit_filter_logit` [b, m] in the batch's hit order (padding: a finite, meaningless logit)."""
        hit_x_valid, hit_valid = batch["hit_x_valid"], batch["hit_valid"]
        hit_x = self.input_norm(batch["hit_x"].float(), hit_x_valid)
        with full_precision(hit_x):
            frame = hit_frame(batch["hit_geometry"], batch["hit_geometry_valid"] & hit_valid, self.timing)
            inputs = torch.cat([hit_x, hit_x_valid.to(hit_x.dtype), frame_features(frame)], dim=-1)
            x = self.input_net(inputs)
        order = self._order(batch, frame)
        x = x.gather(1, order.unsqueeze(-1).expand_as(x))
        valid = hit_valid.gather(1, order)
        if self.neighbourhoods is not None:
            sorted_frame = {name: value.gather(1, order) for name, value in frame.items()}
            x = self.neighbourhoods(x, sorted_frame, valid)
        if self.encoder is not None:
            x = self.encoder(x, valid)
        logit = self.head(x).squeeze(-1)
        return {"hit_filter_logit": torch.zeros_like(logit).scatter(1, order, logit)}

    def loss(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Binary cross-entropy over the real hits of the batch."""
        bce = bce_with_logits(outputs["hit_filter_logit"], muon_hit_labels(batch))
        loss = masked_mean(bce, batch["hit_valid"])
        return {"hit_bce": loss, "loss": loss}

    @staticmethod
    def predict(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Muon probability of every hit [b, m]."""
        return torch.sigmoid(outputs["hit_filter_logit"])

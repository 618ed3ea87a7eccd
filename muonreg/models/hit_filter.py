"""The hit filter: a per-hit muon/background classifier for events of thousands of hits.

At HL-LHC pile-up an event holds thousands of spectrometer hits of which a few percent are a muon's;
the filter keeps the likely muon hits so that the tracker sees a few hundred. Hit input net (as the
tracker's), encoder in local windows over the hits sorted by one coordinate (phi by default: a
muon's hits share a phi sector), and a per-hit logit. Label: the hit belongs to a muon
(truthLink >= 0).
"""

from __future__ import annotations

import torch
from torch import nn

from muonreg.models.encoder import Encoder
from muonreg.models.layers import Standardize, full_precision, mlp
from muonreg.numerics import bce_with_logits, masked_mean


def muon_hit_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """bool [b, m]: the hit belongs to one of the event's muons (truthLink >= 0)."""
    return batch["particle_hit_valid"].any(dim=1)


class HitFilter(nn.Module):
    """Hits -> input net -> windowed encoder (hits sorted by feature `sort_index`) -> logit per hit.

    `window` None: full attention over all hits (memory grows with their square; for comparisons)."""

    def __init__(
        self,
        input_size: int,
        *,
        sort_index: int,
        dim: int = 32,
        encoder_layers: int = 3,
        heads: int = 4,
        window: int | None = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.input_norm = Standardize(input_size)
        self.input_net = mlp(2 * input_size, dim, dim)
        self.encoder = Encoder(dim, encoder_layers, heads, dropout, window=window)
        self.head = mlp(dim, dim, 1)
        self.sort_index = sort_index

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`hit_filter_logit` [b, m] in the batch's hit order (padding: a finite, meaningless logit)."""
        hit_x_valid, hit_valid = batch["hit_x_valid"], batch["hit_valid"]
        hit_x = self.input_norm(batch["hit_x"].float(), hit_x_valid)
        with full_precision(hit_x):
            x = self.input_net(torch.cat([hit_x, hit_x_valid.to(hit_x.dtype)], dim=-1))
        # padding last, so that windows of real hits hold real neighbours
        key = batch["hit_x"][..., self.sort_index].float().masked_fill(~hit_valid, torch.inf)
        order = torch.argsort(key, dim=1, stable=True)
        hits = self.encoder(x.gather(1, order.unsqueeze(-1).expand_as(x)), hit_valid.gather(1, order))
        logit = self.head(hits).squeeze(-1)
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

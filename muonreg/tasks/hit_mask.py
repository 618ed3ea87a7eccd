"""ObjectHitMaskTask: which hits belong to which query's track."""

from __future__ import annotations

import math

import torch
from torch import nn

from muonreg.models.layers import mlp
from muonreg.numerics import bce_with_logits, masked_mean, pairwise_bce


class ObjectHitMaskTask(nn.Module):
    """logit[b, n, m] = <query_net(q_n), hit_net(h_m)> / sqrt(dim).

    The hits' side, `keys = hit_keys(hits)`, is computed once per forward and shared by every
    decoder layer's attention mask and every set of queries: the hits do not change between them.
    `threshold`: the working point, the assignment probability at and above which a hit is the
    track's in the predictions (tracking metrics, fits of the assigned hits, `muonreg.predict`);
    training does not see it.
    """

    def __init__(self, dim: int, loss_weight: float = 1.0, cost_weight: float = 1.0, threshold: float = 0.5):
        super().__init__()
        self.query_net = mlp(dim, dim, dim)
        self.hit_net = mlp(dim, dim, dim)
        self.scale = 1 / math.sqrt(dim)
        self.loss_weight, self.cost_weight = loss_weight, cost_weight
        self.logit_threshold = math.log(threshold / (1 - threshold))

    def hit_keys(self, hits: torch.Tensor) -> torch.Tensor:
        return self.hit_net(hits)

    def logits(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bnd,bmd->bnm", self.query_net(query), keys) * self.scale

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"track_hit_logit": self.logits(query, keys)}

    def claimed(self, query: torch.Tensor, keys: torch.Tensor, threshold: float) -> torch.Tensor:
        """Hits each query claims with probability >= threshold (the decoder's attention mask)."""
        return torch.sigmoid(self.logits(query, keys)) >= threshold

    def cost(
        self, outputs: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], hit_valid: torch.Tensor
    ) -> torch.Tensor:
        return pairwise_bce(outputs["track_hit_logit"], truth["particle_hit_valid"], hit_valid)

    def loss(
        self, outputs: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], hit_valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """BCE over the valid hits of the valid truth slots."""
        bce = bce_with_logits(outputs["track_hit_logit"], truth["particle_hit_valid"])
        mask = truth["particle_valid"].unsqueeze(-1) & hit_valid.unsqueeze(1)
        return {"track_hit_bce": masked_mean(bce, mask)}

    def predict(self, outputs: dict[str, torch.Tensor], hit_valid: torch.Tensor) -> dict[str, torch.Tensor]:
        claimed = outputs["track_hit_logit"] >= self.logit_threshold
        return {"track_hit_valid": claimed & hit_valid.unsqueeze(1)}

"""ObjectValidTask: does a query hold a muon?"""

from __future__ import annotations

import torch
from torch import nn

from muonreg.models.layers import mlp
from muonreg.numerics import average, bce_with_logits


class ObjectValidTask(nn.Module):
    """query -> MLP -> logit that the query holds a muon."""

    def __init__(
        self, dim: int, loss_weight: float = 1.0, cost_weight: float = 10.0, null_weight: float = 1.0
    ):
        super().__init__()
        self.net = mlp(dim, dim, 1)
        self.loss_weight, self.cost_weight, self.null_weight = loss_weight, cost_weight, null_weight

    def forward(self, query: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"track_valid_logit": self.net(query).squeeze(-1)}

    def cost(self, outputs: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> torch.Tensor:
        """BCE of each query's logit [b, n] against each truth slot's validity [b, n] -> [b, n, n]."""
        logits = outputs["track_valid_logit"].unsqueeze(2).expand(-1, -1, truth["particle_valid"].shape[1])
        target = truth["particle_valid"].unsqueeze(1).expand_as(logits)
        return bce_with_logits(logits, target)

    def loss(
        self, outputs: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """BCE over all slots; empty (invalid) slots weighted by null_weight."""
        valid = truth["particle_valid"]
        weight = torch.where(valid, 1.0, self.null_weight).to(outputs["track_valid_logit"].dtype)
        return {"track_valid_bce": average(bce_with_logits(outputs["track_valid_logit"], valid), weight)}

    def predict(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"track_valid": outputs["track_valid_logit"] >= 0}  # probability >= 0.5

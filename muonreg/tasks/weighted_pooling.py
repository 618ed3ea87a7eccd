"""WeightedPoolingObjectHitRegressionTask (seeds/weighted-pooling-regression-task.md).

For each track: p = sigmoid(hit-mask logits); `hard` keeps the valid hits with p >= threshold
(a probability exactly at the threshold is kept) weighted by p, `soft` keeps every valid hit
weighted by p. Raw hit inputs and encoded hits each go through a small net to dim/2 features,
are pooled over the kept hits by the configured ops, and are concatenated with the query
embedding ([q, raw pooled..., encoded pooled...], 5*dim with all four ops) into an MLP head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from muonreg.models.layers import mlp
from muonreg.tasks.pooling import POOLING
from muonreg.tasks.regression import RegressionTask

ASSIGNMENTS = ("hard", "soft")


class WeightedPoolingObjectHitRegressionTask(RegressionTask):
    """Track parameters from the query and the raw and encoded hits its hit-mask logits assign to it."""

    def __init__(
        self,
        dim: int,
        input_size: int,
        fields: Sequence[str],
        inverse_fields: Sequence[str] = ("truthMuon_pt",),
        hit_fields_index: Sequence[int] | None = None,
        assignment_threshold: float = 0.1,
        assignment: str = "hard",
        pooling: Sequence[str] = ("mean", "sum", "max", "min"),
        loss_weight: float = 1.0,
        detach_assignment: bool = False,
        hidden: int | None = None,
    ):
        super().__init__(fields, inverse_fields, loss_weight)
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment={assignment!r} must be one of {list(ASSIGNMENTS)}")
        unknown = [op for op in pooling if op not in POOLING]
        if unknown or not pooling:
            raise ValueError(f"pooling ops {list(pooling)} must be a non-empty subset of {list(POOLING)}")
        if not 0 < assignment_threshold < 1:
            raise ValueError(f"assignment_threshold={assignment_threshold} must be strictly between 0 and 1")
        index = list(range(input_size)) if hit_fields_index is None else list(hit_fields_index)
        if not index or not all(0 <= i < input_size for i in index):
            raise ValueError(f"hit_fields_index {index} must be non-empty columns of the {input_size} inputs")
        self.register_buffer("hit_fields_index", torch.tensor(index, dtype=torch.long), persistent=False)
        self.threshold, self.assignment = assignment_threshold, assignment
        self.pooling = list(pooling)
        self.detach_assignment = detach_assignment
        half = dim // 2
        self.raw_net = mlp(2 * len(index), dim, half)  # values and their validity flags
        self.hit_net = mlp(dim, dim, half)
        self.head = mlp(dim + 2 * half * len(self.pooling), hidden or 2 * dim, len(self.fields), layers=3)

    def assignment_weights(
        self, hit_logit: torch.Tensor, hit_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, selected), both [b, n, m]; weights are p on the selected hits and 0 elsewhere."""
        p = torch.sigmoid(hit_logit.detach() if self.detach_assignment else hit_logit)
        valid = hit_valid.unsqueeze(1)
        selected = (p >= self.threshold) & valid if self.assignment == "hard" else valid.expand_as(p)
        return p * selected, selected

    def pool(
        self, features: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor
    ) -> list[torch.Tensor]:
        return [POOLING[op](features, weights, selected) for op in self.pooling]

    def forward(
        self,
        query: torch.Tensor,
        hits: torch.Tensor,
        hit_x: torch.Tensor,
        hit_x_valid: torch.Tensor,
        hit_valid: torch.Tensor,
        hit_logit: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        weights, selected = self.assignment_weights(hit_logit, hit_valid)
        raw = torch.cat(
            [hit_x[..., self.hit_fields_index], hit_x_valid[..., self.hit_fields_index].to(hit_x.dtype)],
            dim=-1,
        )
        pooled = [
            query,
            *self.pool(self.raw_net(raw), weights, selected),
            *self.pool(self.hit_net(hits), weights, selected),
        ]
        return {"track_regression": self.head(torch.cat(pooled, dim=-1))}

"""Pooling of per-hit features into per-track features, weighted by hit-assignment probabilities.

Each op maps (values [b, m, d], weights [b, n, m], selected [b, n, m]) -> [b, n, d]. Weights are
0 outside the selection. Average and sum are einsums (no [b, n, m, d] tensor); max and min are
unweighted over the selected hits, 0 when a track has none (never +-inf), and keep no [b, n, m, d]
tensor for the backward pass (see numerics.masked_max).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from muonreg.numerics import masked_max, masked_min, weighted_mean, weighted_sum

PoolOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

POOLING: dict[str, PoolOp] = {
    "mean": lambda values, weights, selected: weighted_mean(weights, values),
    "sum": lambda values, weights, selected: weighted_sum(weights, values),
    "max": lambda values, weights, selected: masked_max(values, selected),
    "min": lambda values, weights, selected: masked_min(values, selected),
}

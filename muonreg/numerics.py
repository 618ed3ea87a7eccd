"""The one home of numerically safe operations; no epsilon or clamp lives anywhere else.

Each rule here answers a failure seen in practice (seeds/): a mean over nothing is 0 with a live
graph rather than NaN; an inverse never divides by zero; max/min over nothing is 0, never +-inf;
a log only ever sees a clamped probability, and binary cross-entropy is computed from logits
with softplus, so probabilities of exactly 0 or 1 are harmless.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

INVERSE_MIN = 1e-6  # |x| floor before 1/x: pT = 0 gives 1e6, not inf
INVERSE_MAX = 1e6  # ceiling of a value before 1/x: keeps 1/x away from exact 0
LOG_MIN = 1e-12  # probability floor before log
R_FLOOR = 1e-6  # transverse radius floor (m) for eta = asinh(z / r) on the beam axis
WEIGHT_FLOOR = 1e-12  # denominator floor of weighted means (weights are >= 0)
COST_CEILING = 1e6  # a non-finite matching cost is replaced by this


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of `x` where `mask`; 0 (with gradient 0, never NaN) when nothing is selected."""
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def weighted_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_m w[b,n,m] v[b,m,d] -> [b,n,d] as one batched matmul, never materialising [b,n,m,d]."""
    return torch.einsum("bnm,bmd->bnd", weights.to(values.dtype), values)


def weighted_mean(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Weighted average over hits; 0 where all weights are 0."""
    total = weights.sum(-1, keepdim=True).clamp(min=WEIGHT_FLOOR).to(values.dtype)
    return weighted_sum(weights, values) / total


def _masked_extreme(values: torch.Tensor, selected: torch.Tensor, largest: bool) -> torch.Tensor:
    if values.shape[1] == 0:  # a batch without hits: nothing to reduce over
        return values.new_zeros(selected.shape[0], selected.shape[1], values.shape[2])
    fill = torch.finfo(values.dtype).min if largest else torch.finfo(values.dtype).max
    expanded = values.unsqueeze(1).masked_fill(~selected.unsqueeze(-1), fill)  # [b, n, m, d]
    extreme = expanded.amax(2) if largest else expanded.amin(2)
    return torch.where(selected.any(-1, keepdim=True), extreme, torch.zeros_like(extreme))


def masked_max(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """max over selected hits, values [b,m,d], selected [b,n,m] -> [b,n,d]; 0 when none is selected."""
    return _masked_extreme(values, selected, largest=True)


def masked_min(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """min over selected hits; 0 when none is selected."""
    return _masked_extreme(values, selected, largest=False)


def safe_inverse(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """1/x of a positive quantity (pT), with x clamped to [INVERSE_MIN, INVERSE_MAX]: always finite."""
    if isinstance(x, np.ndarray):
        return 1.0 / np.clip(x, INVERSE_MIN, INVERSE_MAX)
    return 1.0 / x.clamp(INVERSE_MIN, INVERSE_MAX)


def safe_log(p: torch.Tensor) -> torch.Tensor:
    """log of a probability clamped away from 0 (seeds/nan-kl-log-zero.md)."""
    return torch.log(p.clamp(min=LOG_MIN))


def bce_with_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Elementwise binary cross-entropy from logits: finite for any finite logit, no log(0)."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")


def pairwise_bce(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean BCE over valid hits between every prediction n and every target p -> [b, n, p].

    BCE(x, t) = softplus(x) - x t for t in {0, 1}, so both sums are matrix products and padded
    hits (valid False) contribute nothing; an event without valid hits costs 0.
    """
    v = valid.to(logits.dtype).unsqueeze(1)  # [b, 1, m]
    positive = (F.softplus(logits) * v).sum(-1, keepdim=True)  # [b, n, 1]
    overlap = torch.einsum("bnm,bpm->bnp", logits * v, targets.to(logits.dtype))
    return (positive - overlap) / valid.sum(-1).clamp(min=1).to(logits.dtype)[:, None, None]


def finite_cost(cost: torch.Tensor) -> torch.Tensor:
    """A matching cost the assignment solver accepts even if a logit went non-finite."""
    return torch.nan_to_num(cost, nan=COST_CEILING, posinf=COST_CEILING, neginf=-COST_CEILING)


def all_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def safe_eta(z: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Pseudorapidity -ln tan(theta/2) written as asinh(z/r) with r floored: finite at theta 0 and pi."""
    return np.arcsinh(z / np.maximum(r, R_FLOOR)).astype(np.float32)

"""The one home of numerically safe operations; no epsilon or clamp lives anywhere else.

Each rule here answers a failure seen in practice (seeds/): a mean over nothing is 0 with a live
graph rather than NaN; an inverse never divides by zero; max/min over nothing is 0, never +-inf;
a log only ever sees a clamped probability, and binary cross-entropy is computed from logits
with softplus, so probabilities of exactly 0 or 1 are harmless.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

INVERSE_MIN = 1e-6  # |x| floor before 1/x: pT = 0 gives 1e6, not inf
INVERSE_MAX = 1e6  # |x| ceiling before 1/x: keeps 1/x away from exact 0, so inverting twice is finite
LOG_MIN = 1e-12  # probability floor before log
R_FLOOR = 1e-6  # transverse radius floor (m) for eta = asinh(z / r) on the beam axis
WEIGHT_FLOOR = 1e-12  # denominator floor of weighted means (weights are >= 0)
COST_CEILING = 1e6  # a non-finite matching cost is replaced by this
UNIT_FLOOR = 1e-12  # length floor before normalising a 2-vector (a direction from no hits)
SOLVE_JITTER = 1e-9  # relative diagonal load of a normal-equation matrix before solving
MEASUREMENT_SIGMA_FLOOR = (
    1e-5  # m: a hit's resolution floor before 1/sigma^2 (no measurement is better than 10 um)
)
FINITE_DIFFERENCE_STEP = (
    1e-6  # step of a forward-difference derivative in a track's parameters (rad, rad, 1/GeV)
)
LOG_SIGMA_RANGE = (-27.6, 13.8)  # log of an uncertainty: e^-27.6 = 1e-12 to e^13.8 = 1e6, never 0 or inf


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of `x` where `mask`; 0 (with gradient 0, never NaN) when nothing is selected."""
    mask = mask.expand_as(x)
    kept = torch.where(mask, x, torch.zeros_like(x))  # not x * mask: inf * 0 would be NaN
    count = mask.to(x.dtype)
    if dim is None:
        return kept.sum() / count.sum().clamp(min=1)
    return kept.sum(dim) / count.sum(dim).clamp(min=1)


def average(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w x) / sum(w) over all elements (like np.average), for weights >= 0; 0 when all are 0."""
    total = weights.sum(dtype=torch.float32).clamp(min=WEIGHT_FLOOR)
    return ((x * weights).sum(dtype=torch.float32) / total).to(x.dtype)


def weighted_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_m w[b,n,m] v[b,m,d] -> [b,n,d] as one batched matmul, never materialising [b,n,m,d]."""
    return torch.einsum("bnm,bmd->bnd", weights.to(values.dtype), values)


def weighted_mean(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Weighted average over hits (weights >= 0); 0 where all weights are 0.

    The denominator stays in float32 so the floor survives half precision (1e-12 is 0 in fp16).
    """
    total = weights.sum(-1, keepdim=True, dtype=torch.float32).clamp(min=WEIGHT_FLOOR)
    return (weighted_sum(weights, values) / total).to(values.dtype)


def weighted_average(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum(w v) / sum(w) over the last axis, kept with size 1 (weights >= 0); 0 where all weights are 0."""
    total = weights.sum(-1, keepdim=True).clamp(min=WEIGHT_FLOOR)
    return (weights * values).sum(-1, keepdim=True) / total


def safe_unit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) scaled to unit length; (0, 0) stays (0, 0), with finite gradients (no 0/0)."""
    norm = (x * x + y * y).clamp(min=UNIT_FLOOR**2).sqrt()
    return x / norm, y / norm


def _masked_extreme(values: torch.Tensor, selected: torch.Tensor, largest: bool) -> torch.Tensor:
    """Find each extreme's hit without gradient, then gather it from `values` [b, m, d].

    The [b, n, m, d] masked copy exists only inside no_grad and is freed at once: autograd keeps
    just the [b, n, d] indices, and the backward pass is a scatter into [b, m, d].
    """
    b, n, d = selected.shape[0], selected.shape[1], values.shape[2]
    if values.shape[1] == 0:  # a batch without hits: nothing to reduce over
        return values.new_zeros(b, n, d)
    with torch.no_grad():
        fill = torch.finfo(values.dtype).min if largest else torch.finfo(values.dtype).max
        masked = values.unsqueeze(1).masked_fill(~selected.unsqueeze(-1), fill)
        index = masked.argmax(2) if largest else masked.argmin(2)  # [b, n, d]
    extreme = values.gather(1, index)  # extreme[b, n, k] = values[b, index[b, n, k], k]
    return torch.where(selected.any(-1, keepdim=True), extreme, torch.zeros_like(extreme))


def masked_max(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """max over selected hits, values [b,m,d], selected [b,n,m] -> [b,n,d]; 0 when none is selected."""
    return _masked_extreme(values, selected, largest=True)


def masked_min(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """min over selected hits; 0 when none is selected."""
    return _masked_extreme(values, selected, largest=False)


def safe_inverse(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """1/x with |x| clamped to [INVERSE_MIN, INVERSE_MAX] and the sign kept (0 counts as positive).

    Always finite, with finite gradients: pT = 0 gives 1e6, and q/pT keeps its charge.
    """
    if isinstance(x, np.ndarray):
        return np.where(x < 0, -1.0, 1.0) / np.clip(np.abs(x), INVERSE_MIN, INVERSE_MAX)
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype) / x.abs().clamp(INVERSE_MIN, INVERSE_MAX)


def safe_log(p: torch.Tensor) -> torch.Tensor:
    """log of a probability clamped away from 0 (seeds/nan-kl-log-zero.md)."""
    return torch.log(p.clamp(min=LOG_MIN))


def sigma_from_log(log_sigma: torch.Tensor) -> torch.Tensor:
    """exp of a log-uncertainty clamped to LOG_SIGMA_RANGE: a pull never divides by 0, a sigma is never inf."""
    return torch.exp(log_sigma.clamp(*LOG_SIGMA_RANGE))


def bce_with_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Elementwise binary cross-entropy from logits: finite for any finite logit, no log(0)."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")


def pairwise_bce(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean BCE over valid hits between every prediction n and every target p -> [b, n, p].

    BCE(x, t) = t softplus(-x) + (1 - t) softplus(x) (both -log sigmoid terms, never log 0), so the
    sums over hits are matrix products of non-negative terms without cancellation; padded hits
    (valid False) contribute nothing whatever their logits, and an event without valid hits costs 0.
    """
    v = valid.unsqueeze(1)  # [b, 1, m]
    zero = torch.zeros_like(logits)
    miss = torch.where(v, F.softplus(-logits), zero)  # cost of a hit the target owns
    claim = torch.where(v, F.softplus(logits), zero)  # cost of a hit the target does not own
    t = targets.to(logits.dtype)
    total = torch.einsum("bnm,bpm->bnp", miss, t) + torch.einsum("bnm,bpm->bnp", claim, 1 - t)
    return total / valid.sum(-1).clamp(min=1).to(logits.dtype)[:, None, None]


def finite_cost(cost: torch.Tensor) -> torch.Tensor:
    """A matching cost the assignment solver accepts even if a logit went non-finite."""
    return torch.nan_to_num(cost, nan=COST_CEILING, posinf=COST_CEILING, neginf=-COST_CEILING)


def all_finite(x: torch.Tensor) -> bool:
    """True when no element is NaN or +-inf (a host sync: for guards, not for the forward pass)."""
    return bool(torch.isfinite(x).all())


def assert_finite(tensors: torch.Tensor | Mapping[str, torch.Tensor], what: str = "tensor") -> None:
    """Raise FloatingPointError naming every non-finite entry (floating-point tensors only)."""
    if isinstance(tensors, torch.Tensor):
        tensors = {what: tensors}
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not all_finite(t)]
    if bad:
        raise FloatingPointError(f"non-finite values in {what}: {', '.join(bad)}")


def safe_eta(z: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Pseudorapidity -ln tan(theta/2) written as asinh(z/r) with r floored: finite at theta 0 and pi."""
    return np.arcsinh(z / np.maximum(r, R_FLOOR)).astype(np.float32)

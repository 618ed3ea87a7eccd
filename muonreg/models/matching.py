"""Assignment of predictions to truth slots: Hungarian on CPU, or exact permutations on device.

`Matcher()(cost)` takes cost[b, i, j] (prediction i, truth slot j, square) and returns
perm[b, j]: the prediction assigned to truth slot j. With few queries (2 for muons) trying all
N! permutations on the tensor's device is exact and avoids copying the cost to the host every
step; scipy's linear_sum_assignment serves larger N.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from muonreg.numerics import finite_cost

METHODS = ("auto", "scipy", "permutation")


def hungarian(cost: torch.Tensor) -> torch.Tensor:
    """scipy's linear_sum_assignment per event, on the host (a device sync; any n)."""
    costs = finite_cost(cost).detach().float().cpu().numpy()
    perm = np.empty(costs.shape[:2], dtype=np.int64)
    for b, c in enumerate(costs):
        rows, cols = linear_sum_assignment(c)
        perm[b, cols] = rows
    return torch.from_numpy(perm).to(cost.device)


@functools.cache
def _permutations(n: int, device: torch.device) -> torch.Tensor:
    """All n! orderings [n!, n], built once per device: no host-to-device copy (a sync) per step."""
    return torch.tensor(list(itertools.permutations(range(n))), device=device)


def permutation_match(cost: torch.Tensor) -> torch.Tensor:
    """Exact minimum-cost assignment by trying every permutation at once (for small n)."""
    n = cost.shape[-1]
    perms = _permutations(n, cost.device)  # [k, n]: perms[k, j] = prediction for truth slot j
    slots = torch.arange(n, device=cost.device)
    totals = finite_cost(cost)[:, perms, slots].sum(-1)  # [b, k]
    return perms[totals.argmin(-1)]


class Matcher:
    """cost [b, predictions, truth slots] -> perm [b, truth slots]; `auto` is exact on device for n <= 4."""

    def __init__(self, method: str = "auto", max_permutation_size: int = 4):
        if method not in METHODS:
            raise ValueError(f"matcher method {method!r} not in {list(METHODS)}")
        self.method = method
        self.max_permutation_size = max_permutation_size

    @torch.no_grad()
    def __call__(self, cost: torch.Tensor) -> torch.Tensor:
        exact = self.method == "permutation" or (
            self.method == "auto" and cost.shape[-1] <= self.max_permutation_size
        )
        return permutation_match(cost) if exact else hungarian(cost)

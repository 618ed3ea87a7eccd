"""Matching: the on-device permutation matcher equals brute force and scipy's Hungarian."""

import itertools

import numpy as np
import pytest
import torch

from muonreg.models.matching import Matcher, hungarian, permutation_match


def brute_force(cost: np.ndarray) -> tuple[float, tuple[int, ...]]:
    n = cost.shape[0]
    return min((sum(cost[p[j], j] for j in range(n)), p) for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_matchers_equal_brute_force(n):
    torch.manual_seed(n)
    cost = torch.rand(64, n, n)
    for match in (hungarian, permutation_match, Matcher("auto"), Matcher("scipy")):
        perm = match(cost)
        assert perm.shape == (64, n)
        for b in range(64):
            best, best_perm = brute_force(cost[b].numpy())
            got = sum(float(cost[b, perm[b, j], j]) for j in range(n))
            assert got == pytest.approx(best, abs=1e-6)
            assert tuple(perm[b].tolist()) == best_perm  # random costs: the optimum is unique


def test_matchers_agree_with_each_other_and_survive_non_finite_costs():
    cost = torch.rand(32, 2, 2)
    cost[0, 0, 0] = float("nan")
    cost[1, 1, 0] = float("inf")
    a, b = hungarian(cost), permutation_match(cost)
    assert torch.equal(a, b)
    assert a[0].tolist() == [1, 0] and a[1].tolist() == [0, 1]


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="matcher method 'greedy'"):
        Matcher("greedy")

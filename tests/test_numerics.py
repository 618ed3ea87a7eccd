"""The safe operations: exact values on tiny cases, and finiteness (values and gradients) at the edges."""

import numpy as np
import pytest
import torch

from muonreg import numerics as nx


def test_masked_mean_of_nothing_is_zero_with_a_live_graph():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    empty = nx.masked_mean(x, torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.equal(x.grad, torch.zeros(3))
    assert nx.masked_mean(x, torch.tensor([True, False, True])).item() == 2.0
    rows = nx.masked_mean(
        torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([[True, True], [False, False]]), dim=1
    )
    assert rows.tolist() == [2.0, 0.0]
    # unselected elements are never multiplied in: inf * 0 would be NaN
    assert nx.masked_mean(torch.tensor([1.0, float("inf")]), torch.tensor([True, False])).item() == 1.0


def test_average_with_null_weights_and_with_no_weight_at_all():
    x = torch.tensor([1.0, 4.0, 10.0], requires_grad=True)
    assert nx.average(x, torch.tensor([1.0, 1.0, 0.5])).item() == (1 + 4 + 5) / 2.5
    empty = nx.average(x, torch.zeros(3))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.equal(x.grad, torch.zeros(3))


def test_weighted_mean_over_no_weight_is_zero_in_half_precision():
    values = torch.ones(1, 3, 2, dtype=torch.float16)
    weights = torch.tensor([[[0.0, 0.0, 0.0], [0.5, 0.5, 0.0]]], dtype=torch.float16)
    out = nx.weighted_mean(weights, values)
    assert out.dtype == torch.float16 and out.tolist() == [[[0.0, 0.0], [1.0, 1.0]]]


def test_weighted_pooling_values_by_hand():
    values = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [5.0, -50.0]]])  # [b=1, m=3, d=2]
    weights = torch.tensor([[[0.5, 0.0, 0.25], [0.0, 0.0, 0.0]]])  # two tracks, the second owns nothing
    selected = weights > 0
    np.testing.assert_allclose(nx.weighted_sum(weights, values)[0, 0], [0.5 + 1.25, 5.0 - 12.5])
    np.testing.assert_allclose(nx.weighted_mean(weights, values)[0, 0], [1.75 / 0.75, -7.5 / 0.75], rtol=1e-6)
    assert nx.masked_max(values, selected)[0, 0].tolist() == [5.0, 10.0]
    assert nx.masked_min(values, selected)[0, 0].tolist() == [1.0, -50.0]
    for op in (nx.weighted_sum, nx.weighted_mean):
        assert op(weights, values)[0, 1].tolist() == [0.0, 0.0]
    assert nx.masked_max(values, selected)[0, 1].tolist() == [0.0, 0.0]  # never -inf
    assert nx.masked_min(values, selected)[0, 1].tolist() == [0.0, 0.0]  # never +inf


def test_extrema_gradients_are_finite_when_nothing_is_selected():
    values = torch.randn(2, 5, 3, requires_grad=True)
    selected = torch.zeros(2, 4, 5, dtype=torch.bool)
    selected[0, 0, 2] = True
    (nx.masked_max(values, selected).sum() + nx.masked_min(values, selected).sum()).backward()
    assert torch.isfinite(values.grad).all()
    assert values.grad[0, 2].tolist() == [2.0, 2.0, 2.0] and values.grad.abs().sum() == 6.0


def test_extrema_equal_the_broadcast_reference_values_and_gradients():
    torch.manual_seed(0)
    values = torch.randn(3, 7, 4, requires_grad=True)
    selected = torch.rand(3, 2, 7) > 0.5
    selected[0, 1] = False  # a track with no hits
    upstream = torch.randn(3, 2, 4)
    for ours, reduce in ((nx.masked_max, torch.amax), (nx.masked_min, torch.amin)):
        fill = float("-inf") if reduce is torch.amax else float("inf")
        ref = reduce(values.unsqueeze(1).masked_fill(~selected.unsqueeze(-1), fill), 2)
        ref = torch.where(selected.any(-1, keepdim=True), ref, torch.zeros_like(ref))
        (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), values)
        out = ours(values, selected)
        (grad,) = torch.autograd.grad((out * upstream).sum(), values)
        assert torch.equal(out, ref) and torch.equal(grad, grad_ref)


def test_safe_inverse_clamps_the_magnitude_and_keeps_the_sign():
    x = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 4.0, -0.5, 1e9, -1e9], requires_grad=True)
    expected = [1e6, 1e6, 1e6, -1e6, 0.25, -2.0, 1e-6, -1e-6]
    inv = nx.safe_inverse(x)
    torch.testing.assert_close(inv, torch.tensor(expected))
    inv.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[4].item() == -1 / 16
    np.testing.assert_allclose(nx.safe_inverse(x.detach().numpy()), expected, rtol=1e-6)
    # the clamp keeps both directions finite: inverting twice never overflows
    assert torch.isfinite(nx.safe_inverse(nx.safe_inverse(torch.tensor([0.0, -3.0])))).all()


def test_safe_log_never_gives_inf():
    p = torch.tensor([0.0, 1.0, 0.5], requires_grad=True)
    logp = nx.safe_log(p)
    assert torch.isfinite(logp).all()
    logp.sum().backward()
    assert torch.isfinite(p.grad).all()


def test_bce_is_finite_at_extreme_logits_and_exact_targets():
    logits = torch.tensor([1e4, -1e4, 0.0, 30.0], requires_grad=True)
    targets = torch.tensor([0.0, 1.0, 1.0, 1.0])
    loss = nx.bce_with_logits(logits, targets)
    np.testing.assert_allclose(loss.detach(), [1e4, 1e4, np.log(2), 0.0], atol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_pairwise_bce_matches_elementwise_mean_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6)
    targets = torch.rand(2, 2, 6) > 0.5
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    logits[1, :, 4] = float("inf")  # garbage on padded hits must not matter
    logits[1, :, 5] = float("nan")
    cost = nx.pairwise_bce(logits, targets, valid)
    for b in range(2):
        for n in range(3):
            for p in range(2):
                v = valid[b]
                ref = nx.bce_with_logits(logits[b, n, v], targets[b, p, v]).mean()
                torch.testing.assert_close(cost[b, n, p], ref)
    no_hits = nx.pairwise_bce(logits, targets, torch.zeros(2, 6, dtype=torch.bool))
    assert torch.equal(no_hits, torch.zeros(2, 3, 2))


def test_pairwise_bce_at_extreme_logits_is_exact():
    """Confident logits (+-1e4) cost 0 when right and |logit| per hit when wrong: no cancellation."""
    logits = torch.tensor([[[1e4, -1e4, 1e4]]])
    targets = torch.tensor([[[True, False, True], [False, True, False]]])
    cost = nx.pairwise_bce(logits, targets, torch.ones(1, 3, dtype=torch.bool))
    assert cost.tolist() == [[[0.0, 1e4]]]


def test_assert_finite_names_the_bad_entries():
    nx.assert_finite({"loss": torch.tensor(1.0), "mask": torch.tensor([True])}, "losses")
    with pytest.raises(FloatingPointError, match=r"non-finite values in losses: a, c"):
        nx.assert_finite(
            {"a": torch.tensor(float("nan")), "b": torch.zeros(2), "c": torch.tensor([1.0, -float("inf")])},
            "losses",
        )
    with pytest.raises(FloatingPointError, match="grad"):
        nx.assert_finite(torch.tensor([float("inf")]), "grad")
    assert nx.all_finite(torch.zeros(3)) and not nx.all_finite(torch.tensor([0.0, float("nan")]))


def test_finite_cost_and_eta():
    assert nx.all_finite(nx.finite_cost(torch.tensor([np.nan, np.inf, -np.inf, 1.0])))
    eta = nx.safe_eta(np.array([5.0, -5.0, 0.0]), np.array([0.0, 0.0, 0.0]))
    assert np.isfinite(eta).all() and eta[0] > 0 > eta[1]

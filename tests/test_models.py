"""The MaskFormer: degenerate events, mask attention fallbacks, padding invariance, matching and alignment."""

import pytest
import torch

from muonreg.models import MaskFormer
from muonreg.models.decoder import Decoder
from muonreg.models.layers import Attention, attendable
from muonreg.tasks import ObjectHitMaskTask, ObjectRegressionTask, ObjectValidTask

from conftest import FIELDS, make_model, synthetic_batch


def _finite(outputs):
    return all(torch.isfinite(v).all() for v in outputs.values() if v.is_floating_point())


def test_event_with_zero_hits_and_a_batch_without_hits():
    torch.manual_seed(0)
    model = make_model()
    batch = synthetic_batch()
    batch["hit_valid"][2] = False
    batch["hit_x"][2] = 0
    batch["hit_x_valid"][2] = False
    batch["particle_hit_valid"][2] = False
    out = model(batch)
    assert _finite(out)
    losses = model.loss(out, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    empty = synthetic_batch(m=0)
    out = model(empty)
    assert out["track_hit_logit"].shape == (4, 2, 0) and _finite(out)
    assert all(torch.isfinite(v) for v in model.loss(out, empty).values())


def test_attendable_falls_back_to_valid_keys_then_all_keys():
    mask = torch.tensor(
        [[[True, False, False], [False, False, False]], [[False, False, False], [False, False, False]]]
    )
    key_valid = torch.tensor([[True, True, False], [False, False, False]])
    out = attendable(mask, key_valid)
    assert out.tolist() == [
        [[True, False, False], [True, True, False]],
        [[True, True, True], [True, True, True]],
    ]


@pytest.mark.parametrize("dim, heads", [(32, 8), (24, 2), (32, 4)])
def test_head_padding_for_the_fused_cuda_kernels_changes_no_output_or_gradient(dim, heads):
    """Zero-padded head dims (what CUDA runs, for its fused kernels) give the unpadded attention."""
    torch.manual_seed(0)
    attention = Attention(dim, heads, pad_heads=False)
    x = torch.randn(3, 7, dim, requires_grad=True)
    mask = attendable(torch.rand(3, 7, 7) > 0.5, torch.ones(3, 7, dtype=torch.bool))
    plain = attention(x, x, mask)
    (grad_plain,) = torch.autograd.grad(plain.square().sum(), x)
    attention.pad_heads = True
    padded = attention(x, x, mask)
    (grad_padded,) = torch.autograd.grad(padded.square().sum(), x)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_padded, grad_plain, rtol=1e-5, atol=1e-6)
    assert grad_plain.abs().sum() > 0


def test_query_with_no_claimed_hit_attends_to_all_valid_hits():
    torch.manual_seed(0)
    decoder = Decoder(dim=16, layers=2, heads=4, num_queries=2)
    hits = torch.randn(3, 10, 16)
    hit_valid = torch.arange(10) < torch.tensor([[10], [6], [3]])
    nothing = decoder(hits, hit_valid, lambda q: torch.zeros(3, 2, 10, dtype=torch.bool))[-1]
    everything = decoder(hits, hit_valid, lambda q: torch.ones(3, 2, 10, dtype=torch.bool))[-1]
    assert torch.isfinite(nothing).all()
    torch.testing.assert_close(nothing, everything)


def test_padding_does_not_change_a_real_event():
    torch.manual_seed(0)
    model = make_model().eval()
    batch = synthetic_batch(b=3, m=25, seed=2)
    n = int(batch["hit_valid"][0].sum())
    alone = {k: v[:1, :n] if k.startswith("hit_") else v[:1] for k, v in batch.items()}
    alone["particle_hit_valid"] = batch["particle_hit_valid"][:1, :, :n]
    with torch.no_grad():
        out_batch, out_alone = model(batch), model(alone)
    torch.testing.assert_close(
        out_batch["track_hit_logit"][:1, :, :n], out_alone["track_hit_logit"], atol=1e-5, rtol=1e-4
    )
    for key in ("track_valid_logit", "track_regression", "query_embed"):
        torch.testing.assert_close(out_batch[key][:1], out_alone[key], atol=1e-5, rtol=1e-4)
    cost_batch = model.match(out_batch, batch)[:1]
    assert torch.equal(cost_batch, model.match(out_alone, alone))


def test_hits_with_every_feature_missing_still_count():
    torch.manual_seed(0)
    model = make_model().eval()
    batch = synthetic_batch(seed=3)
    batch["hit_x"][:, :3] = 0
    batch["hit_x_valid"][:, :3] = False  # real hits with no usable feature at all
    with torch.no_grad():
        out = model(batch)
        fewer = dict(batch, hit_valid=batch["hit_valid"].clone())
        fewer["hit_valid"][:, :3] = False
        out_fewer = model(fewer)
    assert _finite(out)
    # they take part in attention: removing them changes the other hits' embeddings
    assert not torch.allclose(out["hit_embed"][:, 3:], out_fewer["hit_embed"][:, 3:])
    predicted = model.predict(out, batch["hit_valid"])["track_hit_valid"]
    assert not (predicted & ~batch["hit_valid"].unsqueeze(1)).any()  # never on padding


def test_match_and_align_put_the_best_query_on_each_truth_slot():
    torch.manual_seed(0)
    model = make_model()
    batch = synthetic_batch(b=2, seed=4)
    batch["particle_valid"][:] = torch.tensor([[True, False], [True, True]])
    with torch.no_grad():
        out = model(batch)
    # make query 1 a perfect copy of truth slot 0's hits in event 0
    target = batch["particle_hit_valid"][0, 0].float() * 40 - 20
    out["track_hit_logit"][0, 1] = target
    out["track_valid_logit"][0] = torch.tensor([-20.0, 20.0])
    perm = model.match(out, batch)
    assert perm[0].tolist() == [1, 0]
    aligned = model.align(out, perm)
    assert torch.equal(aligned["track_hit_logit"][0, 0], target)
    assert torch.equal(aligned["hit_embed"], out["hit_embed"])  # per-hit outputs are not permuted
    assert torch.equal(aligned["query_embed"][0], out["query_embed"][0, [1, 0]])


def test_missing_values_never_reach_a_layer_whatever_the_loader_wrote():
    torch.manual_seed(0)
    model = make_model().eval()
    batch = synthetic_batch(seed=5)
    dirty = dict(batch, hit_x=batch["hit_x"].masked_fill(~batch["hit_x_valid"], float("nan")))
    sentinel = dict(batch, hit_x=batch["hit_x"].masked_fill(~batch["hit_x_valid"], -999.0))
    with torch.no_grad():
        clean = model(batch)
        for other in (model(dirty), model(sentinel)):
            for key in ("track_regression", "track_hit_logit", "track_valid_logit"):
                torch.testing.assert_close(other[key], clean[key])


def _model_with_queries(num_queries: int) -> MaskFormer:
    return MaskFormer(
        6,
        dim=16,
        heads=4,
        num_queries=num_queries,
        valid_task=ObjectValidTask(16),
        hit_mask_task=ObjectHitMaskTask(16),
        regression_task=ObjectRegressionTask(16, FIELDS, ["truthMuon_pt"]),
    )


def test_cost_stays_finite_with_padding_and_more_queries_than_muons():
    torch.manual_seed(0)
    model = _model_with_queries(3)
    batch = synthetic_batch(b=3, seed=6)
    with torch.no_grad():
        out = model(batch)
    out["track_hit_logit"] = out["track_hit_logit"].masked_fill(~batch["hit_valid"][:, None], float("inf"))
    truth = model.truth(batch)  # 2 truth slots padded with an empty third
    assert truth["particle_valid"].shape == (3, 3) and not truth["particle_valid"][:, 2].any()
    assert truth["particle_hit_valid"].shape == (3, 3, 20) and truth["particle_truthMuon_pt"].shape == (3, 3)
    cost = model.hit_mask_task.cost(out, truth, batch["hit_valid"]) + model.valid_task.cost(out, truth)
    assert torch.isfinite(cost).all()
    perm = model.match(out, batch)
    assert sorted(perm[0].tolist()) == [0, 1, 2]
    assert all(torch.isfinite(v) for v in model.loss(out, batch).values())


def test_fewer_queries_than_truth_slots_is_a_clear_error():
    model = _model_with_queries(1)
    batch = synthetic_batch()
    with pytest.raises(ValueError, match=r"2 truth slots but only num_queries=1"):
        model.loss(model(batch), batch)


def test_auxiliary_losses_supervise_earlier_decoder_layers_in_training_only():
    torch.manual_seed(0)
    model = make_model()
    model.aux_loss = True
    batch = synthetic_batch(seed=5)
    batch["particle_valid"][0, 0] = True
    losses = model.loss(model(batch), batch)
    assert "aux_loss" in losses and torch.isfinite(losses["aux_loss"]) and losses["aux_loss"] > 0
    main = sum(losses[k] for k in ("track_valid_bce", "track_hit_bce", "track_regression"))
    torch.testing.assert_close(losses["loss"], main + losses["aux_loss"])
    losses["aux_loss"].backward()
    first_layer = model.decoder.layers[0].cross.q.weight.grad
    assert first_layer is not None and first_layer.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert "aux_loss" not in model.loss(model(batch), batch)  # validation loss: the final layer only

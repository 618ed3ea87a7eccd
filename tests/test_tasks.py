"""The regression tasks: the nine cases of seeds/regression-task-bugfixes.md and the pooling spec."""

import math

import numpy as np
import pytest
import torch

from muonreg.tasks import ObjectHitMaskTask, ObjectRegressionTask, WeightedPoolingObjectHitRegressionTask
from muonreg.tasks.regression import TargetSpace

from conftest import FIELDS, make_model, synthetic_batch


def _fit(model, batch):
    model.regression_task.fit_normalization(batch, batch["particle_valid"])


@pytest.fixture(params=["weighted_pooling", "object_regression"])
def task_name(request):
    return request.param


# 1. forward on random inputs
def test_forward_on_random_inputs(task_name):
    torch.manual_seed(0)
    model, batch = make_model(task_name), synthetic_batch()
    out = model(batch)
    assert out["track_regression"].shape == (4, 2, 4)
    assert out["track_hit_logit"].shape == (4, 2, 20) and out["track_valid_logit"].shape == (4, 2)
    assert all(torch.isfinite(v).all() for v in out.values())


# 2. loss with valid targets, 3. gradients finite and non-zero
def test_loss_and_gradients_finite_and_nonzero(task_name):
    torch.manual_seed(1)
    batch = synthetic_batch(seed=1)
    batch["particle_valid"][0] = True  # at least one muon
    model = make_model(task_name)
    _fit(model, batch)
    losses = model.loss(model(batch), batch)
    assert set(losses) == {"track_valid_bce", "track_hit_bce", "track_regression", "loss"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    losses["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} gets no gradient"


# 4. all tracks invalid
def test_all_tracks_invalid_gives_zero_regression_loss_not_nan(task_name):
    batch = synthetic_batch()
    batch["particle_valid"][:] = False
    batch["particle_hit_valid"][:] = False
    model = make_model(task_name)
    losses = model.loss(model(batch), batch)
    assert losses["track_regression"].item() == 0.0 and losses["track_hit_bce"].item() == 0.0
    assert losses["track_regression"].requires_grad  # a live graph: backward works as usual
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# 5. prediction with inverse fields is in GeV
def test_prediction_with_inverse_fields_is_in_original_space():
    batch = synthetic_batch(b=64, seed=3)
    space = TargetSpace(FIELDS, ["truthMuon_pt"])
    space.fit(batch, batch["particle_valid"])
    internal = space.encode(batch)
    # the network's space is 1/pT standardised, not GeV
    inv_pt = 1 / batch["particle_truthMuon_pt"][batch["particle_valid"]]
    torch.testing.assert_close(
        internal[..., 2][batch["particle_valid"]] * space.std[2] + space.mean[2], inv_pt, rtol=1e-5, atol=1e-7
    )
    decoded = space.decode(internal)  # round trip back to GeV
    valid = batch["particle_valid"]
    for field in FIELDS:
        torch.testing.assert_close(
            decoded[f"track_{field}"][valid], batch[f"particle_{field}"][valid], rtol=1e-4, atol=1e-4
        )
    model = make_model()
    _fit(model, batch)
    pt = model.predict(model(batch), batch["hit_valid"])["track_truthMuon_pt"]
    assert torch.isfinite(pt).all() and (pt > 0).all() and pt.median() > 1  # GeV-scale, not GeV^-1


# 6. no hits assigned
def test_no_hits_assigned_gives_zero_extrema_and_finite_output():
    task = WeightedPoolingObjectHitRegressionTask(16, 6, FIELDS, assignment_threshold=0.5)
    batch = synthetic_batch()
    logits = torch.full((4, 2, 20), -30.0)
    weights, selected = task.assignment_weights(logits, batch["hit_valid"])
    assert not selected.any()
    features = torch.randn(4, 20, 8)
    mean, total, high, low = task.pool(features, weights, selected)
    for pooled in (mean, total, high, low):
        assert torch.equal(pooled, torch.zeros(4, 2, 8))
    out = task(
        torch.randn(4, 2, 16),
        torch.randn(4, 20, 16),
        batch["hit_x"],
        batch["hit_x_valid"],
        batch["hit_valid"],
        logits,
    )
    assert torch.isfinite(out["track_regression"]).all()


# 7. very low pT targets
def test_very_low_pt_targets_give_finite_loss():
    batch = synthetic_batch(seed=4)
    batch["particle_valid"][:, 0] = True
    batch["particle_truthMuon_pt"][:, 0] = torch.tensor([0.0, 1e-8, 1e-3, 5.0])
    model = make_model()
    _fit(model, batch)
    losses = model.loss(model(batch), batch)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# 8. mixed valid/invalid across the batch
def test_mixed_valid_slots_average_over_valid_only():
    task = ObjectRegressionTask(8, FIELDS, ["truthMuon_pt"])
    batch = synthetic_batch(seed=5)
    batch["particle_valid"] = torch.tensor([[True, False], [False, False], [True, True], [False, True]])
    prediction = torch.randn(4, 2, 4)
    loss = task.loss({"track_regression": prediction}, batch)["track_regression"]
    target = task.space.encode(batch)
    valid = batch["particle_valid"]
    expected = torch.nn.functional.smooth_l1_loss(prediction[valid], target[valid])
    torch.testing.assert_close(loss, expected)
    batch["particle_truthMuon_pt"][~valid] = float("nan")  # whatever sits in empty slots is ignored
    assert torch.isfinite(task.loss({"track_regression": prediction}, batch)["track_regression"])


# 9. a short training loop whose loss decreases
def test_short_training_loop_decreases_loss(task_name):
    torch.manual_seed(0)
    batch = synthetic_batch(b=16, seed=6)
    model = make_model(task_name)
    _fit(model, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(100):
        loss = model.loss(model(batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert np.mean(history[-5:]) < 0.7 * np.mean(history[:5])


def test_pooling_by_hand_with_a_probability_exactly_at_threshold():
    task = WeightedPoolingObjectHitRegressionTask(4, 2, FIELDS, assignment_threshold=0.5)
    hit_valid = torch.tensor([[True, True, True, False]])
    # probabilities 0.5 (exactly the threshold: kept), 0.75, 0.25 (dropped), and a padded hit
    logits = torch.logit(torch.tensor([[[0.5, 0.75, 0.25, 0.9]]]))
    weights, selected = task.assignment_weights(logits, hit_valid)
    assert selected.tolist() == [[[True, True, False, False]]]
    torch.testing.assert_close(weights, torch.tensor([[[0.5, 0.75, 0.0, 0.0]]]))
    features = torch.tensor([[[2.0, -1.0], [4.0, 3.0], [100.0, 100.0], [-100.0, -100.0]]])
    mean, total, high, low = task.pool(features, weights, selected)
    torch.testing.assert_close(total, torch.tensor([[[1.0 + 3.0, -0.5 + 2.25]]]))
    torch.testing.assert_close(mean, torch.tensor([[[4.0 / 1.25, 1.75 / 1.25]]]))
    assert high.tolist() == [[[4.0, 3.0]]] and low.tolist() == [[[2.0, -1.0]]]
    soft = WeightedPoolingObjectHitRegressionTask(4, 2, FIELDS, assignment="soft", pooling=["sum"])
    weights, selected = soft.assignment_weights(logits, hit_valid)
    assert selected.tolist() == [[[True, True, True, False]]]
    torch.testing.assert_close(soft.pool(features, weights, selected)[0], torch.tensor([[[29.0, 26.75]]]))


def test_pooled_concatenation_size_follows_the_ops():
    for ops, width in (
        (["mean", "sum", "max", "min"], 5 * 16),
        (["mean"], 16 + 16),
        (["max", "min"], 16 + 32),
    ):
        task = WeightedPoolingObjectHitRegressionTask(16, 6, FIELDS, pooling=ops)
        assert task.head[0].in_features == width


def test_qpt_target_predicts_pt_and_charge():
    fields = ["truthMuon_eta", "truthMuon_phi", "truthMuon_qpt"]
    batch = synthetic_batch(b=32, seed=7, fields=fields)
    space = TargetSpace(fields)
    space.fit(batch, batch["particle_valid"])
    decoded = space.decode(space.encode(batch))
    valid = batch["particle_valid"]
    qpt = batch["particle_truthMuon_qpt"][valid]
    torch.testing.assert_close(decoded["track_truthMuon_pt"][valid], 1 / qpt.abs(), rtol=1e-4, atol=1e-4)
    assert torch.equal(decoded["track_truthMuon_q"][valid], torch.sign(qpt))


def test_an_inverted_signed_field_keeps_its_sign():
    fields = ["truthMuon_qpt"]
    batch = synthetic_batch(b=32, seed=8, fields=fields)
    space = TargetSpace(fields, inverse_fields=fields)  # regress q * pT: the sign is the charge
    valid = batch["particle_valid"]
    space.fit(batch, valid)
    qpt = batch["particle_truthMuon_qpt"][valid]
    decoded = space.decode(space.encode(batch))
    torch.testing.assert_close(decoded["track_truthMuon_qpt"][valid], qpt)
    torch.testing.assert_close(decoded["track_truthMuon_pt"][valid], 1 / qpt.abs(), rtol=1e-4, atol=1e-4)


def test_normalisation_is_saved_with_the_model():
    batch = synthetic_batch(b=64, seed=9)
    task = ObjectRegressionTask(8, FIELDS, ["truthMuon_pt"])
    task.fit_normalization(batch, batch["particle_valid"])
    state = task.state_dict()
    assert {"space.mean", "space.std"} <= set(state) and "space.inverse" not in state
    restored = ObjectRegressionTask(8, FIELDS, ["truthMuon_pt"])
    restored.load_state_dict(state)
    valid = batch["particle_valid"]
    inv_pt = 1 / batch["particle_truthMuon_pt"][valid]
    torch.testing.assert_close(restored.space.mean[2], inv_pt.mean())
    torch.testing.assert_close(restored.space.std[2], inv_pt.std(unbiased=False))
    encoded = restored.space.encode(batch)[valid]
    torch.testing.assert_close(encoded.mean(0), torch.zeros(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("detach", [False, True])
def test_detach_assignment_decides_whether_regression_trains_the_hit_mask(detach):
    torch.manual_seed(0)
    task = WeightedPoolingObjectHitRegressionTask(16, 6, FIELDS, detach_assignment=detach)
    batch = synthetic_batch()
    logits = torch.randn(4, 2, 20, requires_grad=True)
    inputs = (torch.randn(4, 2, 16), torch.randn(4, 20, 16), batch["hit_x"], batch["hit_x_valid"])
    task(*inputs, batch["hit_valid"], logits)["track_regression"].sum().backward()
    if detach:
        assert logits.grad is None
    else:
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
        assert (logits.grad[~batch["hit_valid"][:, None].expand_as(logits)] == 0).all()  # padding: none


def test_bad_task_settings_are_rejected():
    with pytest.raises(ValueError, match=r"inverse field\(s\) \['truthMuon_p'\] are not regression targets"):
        ObjectRegressionTask(8, FIELDS, ["truthMuon_p"])
    with pytest.raises(ValueError, match="pooling ops"):
        WeightedPoolingObjectHitRegressionTask(8, 4, FIELDS, pooling=["median"])
    with pytest.raises(ValueError, match="assignment="):
        WeightedPoolingObjectHitRegressionTask(8, 4, FIELDS, assignment="fuzzy")
    with pytest.raises(ValueError, match=r"hit_fields_index \[0, 4\]"):
        WeightedPoolingObjectHitRegressionTask(8, 4, FIELDS, hit_fields_index=[0, 4])


# -- target space: positive pT, phi across the seam, per-field weights -----------------------------
def test_pt_is_positive_even_from_a_negative_raw_output():
    space = TargetSpace(FIELDS, ["truthMuon_pt"])
    raw = torch.zeros(1, 1, 4)
    raw[..., 2] = -(space.mean[2] + 0.02) / space.std[2]  # decodes to 1/pT = -0.02
    decoded = space.decode(raw)["track_truthMuon_pt"]
    assert decoded.item() == pytest.approx(50.0, rel=1e-4)


def test_phi_loss_is_taken_the_short_way_round_the_circle():
    batch = synthetic_batch(b=2, seed=4)
    batch["particle_valid"][:] = False
    batch["particle_valid"][0, 0] = True
    batch["particle_truthMuon_phi"][0, 0] = -math.pi + 0.05
    task = ObjectRegressionTask(
        16, FIELDS, ["truthMuon_pt"], field_weights={f: 0.0 for f in FIELDS[:1] + FIELDS[2:]}
    )
    task.fit_normalization(batch, batch["particle_valid"])
    raw = task.space.encode(batch).clone()
    raw[0, 0, 1] = (math.pi - 0.05 - task.space.mean[1]) / task.space.std[1]  # 0.1 rad across the seam
    loss = task.loss({"track_regression": raw}, batch)["track_regression"]
    error = 0.1 / task.space.std[1]  # in standard deviations
    assert loss.item() == pytest.approx(
        0.5 * error.item() ** 2 / 4, rel=1e-3
    )  # smooth L1, mean over 4 fields
    assert task.predict({"track_regression": raw})["track_truthMuon_phi"][0, 0].item() == pytest.approx(
        math.pi - 0.05, abs=1e-5
    )


def test_field_loss_weights_scale_each_field():
    batch = synthetic_batch(b=8, seed=5)
    batch["particle_valid"][0, 0] = True
    raw = torch.randn(8, 2, 4)
    one = ObjectRegressionTask(16, FIELDS, ["truthMuon_pt"])
    eta_only = ObjectRegressionTask(16, FIELDS, ["truthMuon_pt"], field_weights={f: 0.0 for f in FIELDS[1:]})
    doubled = ObjectRegressionTask(16, FIELDS, ["truthMuon_pt"], field_weights={FIELDS[0]: 2.0})
    for task in (one, eta_only, doubled):
        task.fit_normalization(batch, batch["particle_valid"])
    losses = [t.loss({"track_regression": raw}, batch)["track_regression"] for t in (one, eta_only, doubled)]
    assert losses[2] - losses[0] == pytest.approx(losses[1].item(), rel=1e-5)
    with pytest.raises(ValueError, match="not targets"):
        ObjectRegressionTask(16, FIELDS, field_weights={"truthMuon_x": 1.0})


# -- pooling that sees the bending ----------------------------------------------------------------
def _geometry_batch(b=3, m=12, seed=0):
    from muonreg.data.geometry import GEOMETRY, G

    batch = synthetic_batch(b=b, m=m, seed=seed)
    g = torch.zeros(b, m, len(GEOMETRY))
    gen = torch.Generator().manual_seed(seed)
    g[..., G["normal"]] = 5 + 5 * torch.rand(b, m, generator=gen)
    g[..., G["z"]] = torch.rand(b, m, generator=gen)
    g[..., G["cos_phi_s"]] = g[..., G["cos_phi"]] = 1.0
    g[..., G["barrel"]] = g[..., G["mdt"]] = 1.0
    g[..., G["drift"]] = 0.007 * torch.rand(b, m, generator=gen)
    g[..., G["sigma"]] = 1e-4
    g[..., G["station"]] = torch.randint(0, 5, (b, m), generator=gen).float()
    batch["hit_geometry"], batch["hit_geometry_valid"] = g, batch["hit_valid"].clone()
    return batch


def test_station_pooling_by_hand():
    task = WeightedPoolingObjectHitRegressionTask(4, 2, FIELDS, pooling=["station"], assignment_threshold=0.5)
    from muonreg.tasks.weighted_pooling import _station_mean

    weights = torch.tensor([[[0.5, 1.0, 0.0, 1.0]]])
    groups = torch.nn.functional.one_hot(torch.tensor([[0, 0, 1, 4]]), 5).float()
    share = torch.einsum("bnm,bms->bns", weights, groups)
    values = torch.tensor([[[2.0], [5.0], [100.0], [-1.0]]])
    mean = _station_mean(values, weights, groups, share)
    assert mean.tolist() == [[[(0.5 * 2 + 5) / 1.5, 0.0, 0.0, 0.0, -1.0]]]  # empty stations: 0
    assert task.head[0].in_features == 4 + (2 * 2 + 1) * 5


@pytest.mark.parametrize("pooling, local", [(["station"], False), (["fit"], False), (["mean", "fit"], True)])
def test_bending_aware_pooling_trains_with_finite_gradients(pooling, local):
    torch.manual_seed(0)
    batch = _geometry_batch()
    batch["particle_valid"][0, 0] = True
    model = make_model(pooling=pooling, local=local)
    _fit(model, batch)
    losses = model.loss(model(batch), batch)
    losses["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_anchored_head_starts_at_the_fit_estimate():
    batch = _geometry_batch(seed=2)
    model = make_model(pooling=["fit"])
    _fit(model, batch)
    task = model.regression_task
    out = model(batch)
    weights, _ = task.assignment_weights(out["track_hit_logit"], batch["hit_valid"])
    fit = task.fit(batch["hit_geometry"], weights * batch["hit_geometry_valid"].unsqueeze(1))
    torch.testing.assert_close(out["track_regression"], task._anchor(fit).float())


def test_the_pull_loss_measures_only_the_curvature_in_units_of_its_expected_error():
    """The loss divides the curvature's error by the scale the forward gives a unit correction (a pull),
    over sqrt(pull_loss); the other fields keep their plain errors."""
    batch = _geometry_batch(seed=4)
    assert "track_regression_scale" not in make_model(pooling=["fit"])(batch)
    model = make_model(pooling=["fit"], pull_loss=0.25).eval()
    _fit(model, batch)
    task = model.regression_task
    anchor = model(batch)["track_regression"]  # the head starts at zero: the fit's estimate
    with torch.no_grad():
        task.head[-1].bias.fill_(1.0)  # a correction of one unit in every field
    out = model(batch)
    unit = out["track_regression"] - anchor  # what one unit of correction moves each field
    curvature = task.fields.index("truthMuon_pt")
    scale = out["track_regression_scale"]
    torch.testing.assert_close(scale[..., curvature], unit[..., curvature] / 0.25**0.5, rtol=1e-4, atol=1e-5)
    others = [i for i in range(len(task.fields)) if i != curvature]
    assert (scale[..., others] == 1).all() and (unit[..., curvature] > 1e-3).all()
    assert torch.isfinite(model.loss(out, batch)["loss"])


def test_correction_scale_by_hand():
    """The expected error of the fit's estimates, in units of each target's spread, at eta 0 and p = 10 GeV."""
    task = WeightedPoolingObjectHitRegressionTask(
        16, 6, ["truthMuon_qpt", "truthMuon_eta", "truthMuon_phi"], inverse_fields=[], pooling=["fit"]
    )
    task.space.std.copy_(torch.tensor([0.05, 1.0, 2.0]))
    fit = {k: torch.tensor([[v]]) for k, v in (("eta", 0.0), ("p", 10.0), ("qp_sigma", 0.003), ("qpt", 0.1))}
    scale = task._correction_scale(fit)[0, 0]
    # q/pT: sqrt(0.003^2 + (0.3 / 10^2)^2) = 0.0042426, over 0.05; eta: sqrt(0.002^2 + (0.15 / 10)^2) = 0.0151327;
    # phi: sqrt(0.0151327^2 + (0.36 * 0.0042426)^2) = 0.0152092, over 2
    torch.testing.assert_close(scale, torch.tensor([0.084853, 0.0151327, 0.0076046]), rtol=1e-4, atol=0)


def test_local_coordinates_need_the_fit():
    with pytest.raises(ValueError, match="add `fit`"):
        WeightedPoolingObjectHitRegressionTask(16, 6, FIELDS, pooling=["mean"], local=True)


def test_oracle_regression_is_the_networks_regression_on_the_truth_assignment():
    """Two paths agree: the oracle, and the network's own regression (from hit logits, as in forward) given
    logits that say exactly the truth. Dropping one truth hit of one muon moves that muon's oracle only."""
    batch = _geometry_batch(seed=3)
    model = make_model(pooling=["mean", "fit"]).eval()
    _fit(model, batch)
    out = model(batch)
    aligned = model.align(out, model.match(out, batch))
    oracle = model.oracle_regression(aligned, batch)
    truth = model.truth(batch)["particle_hit_valid"]
    inputs = model._regression_inputs(
        batch, out["hit_embed"], model.input_norm(batch["hit_x"], batch["hit_x_valid"])
    )
    perfect = model.regression_task(
        query=aligned["query_embed"], hit_logit=torch.where(truth, 50.0, -50.0), **inputs
    )
    network = model.regression_task.predict(perfect)
    for field in FIELDS:
        torch.testing.assert_close(oracle[f"track_{field}"], network[f"track_{field}"], rtol=1e-5, atol=1e-5)
    b, j = (batch["particle_hit_valid"].sum(-1) >= 3).nonzero()[0].tolist()
    fewer = {**batch, "particle_hit_valid": batch["particle_hit_valid"].clone()}
    fewer["particle_hit_valid"][b, j, fewer["particle_hit_valid"][b, j].nonzero()[0]] = False
    moved = model.oracle_regression(aligned, fewer)["track_truthMuon_eta"]
    changed = moved != oracle["track_truthMuon_eta"]
    assert changed[b, j] and changed.sum() == 1


def test_input_standardisation_is_fitted_and_saved():
    from muonreg.models.layers import Standardize

    norm = Standardize(2)
    x = torch.tensor([[1.0, 100.0], [3.0, 300.0], [5.0, -999.0]])
    valid = torch.tensor([[True, True], [True, True], [True, False]])
    norm.fit(x, valid)
    torch.testing.assert_close(norm.mean, torch.tensor([3.0, 200.0]))
    out = norm(x, valid)
    assert out[2, 1] == 0 and out[:, 0].tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-4)
    assert set(norm.state_dict()) == {"mean", "std"}


def test_hit_mask_working_point_by_hand():
    """A hit is the track's at probability >= threshold: logits 0.4 / 0.9 / 1.2 are probabilities
    0.599 / 0.711 / 0.769; a padded hit never is."""
    logits = torch.tensor([[[0.4, 0.9, 1.2, 5.0]]])
    valid = torch.tensor([[True, True, True, False]])
    expected = {
        0.5: [True, True, True, False],
        0.7: [False, True, True, False],
        0.75: [False, False, True, False],
    }
    for threshold, claimed in expected.items():
        task = ObjectHitMaskTask(8, threshold=threshold)
        got = task.predict({"track_hit_logit": logits}, valid)["track_hit_valid"]
        assert got[0, 0].tolist() == claimed, threshold
    # the default is the probability 0.5, logit 0 included
    zero = ObjectHitMaskTask(8).predict(
        {"track_hit_logit": torch.zeros(1, 1, 1)}, torch.ones(1, 1, dtype=bool)
    )
    assert zero["track_hit_valid"].item()

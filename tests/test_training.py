"""The training loop: the health guard's three paths, and exact continuation from a checkpoint."""

import logging
import math
import os
import warnings

import numpy as np
import pytest
import torch

from muonreg.config import ConfigError
from muonreg.data.dataset import MuonEventDataset, make_loader
from muonreg.data.features import HitFeatures
from muonreg.data.format import DatasetReader
from muonreg.machine import usable_cores
from muonreg.training.checkpoint import load_checkpoint
from muonreg.training.device import to_device
from muonreg.training.health import HealthGuard, NonFiniteTrainingError
from muonreg.training.loop import Trainer
from muonreg.training.optim import build_optimizer, build_scheduler
from muonreg.training.setup import LOADER_WORKERS, loader_workers

from conftest import FIELDS, make_model, random_events, write_reference_dataset

FEATURES = ["spacePoint_globEdgeLowX", "spacePoint_globEdgeLowZ", "spacePoint_driftR", "r", "eta", "phi"]


@pytest.fixture(scope="module")
def loaders(tmp_path_factory):
    hits, tracks = random_events(120, seed=11)
    path = write_reference_dataset(tmp_path_factory.mktemp("data") / "ds", hits, tracks)
    reader = DatasetReader(path)
    features = HitFeatures(FEATURES, reader.hit_features)
    split = {"train": range(0, 80), "val": range(80, 100), "test": range(100, 120)}
    datasets = {k: MuonEventDataset(reader, features, FIELDS, 2, indices=list(v)) for k, v in split.items()}
    return {
        "train": make_loader(datasets["train"], 16, shuffle=True, seed=1),
        "val": make_loader(datasets["val"], 32, shuffle=False),
        "test": make_loader(datasets["test"], 32, shuffle=False),
    }


def _trainer(loaders, tmp_path, max_consecutive=3, max_epochs=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = make_model(input_size=len(FEATURES))
    optimizer = build_optimizer(model, 1e-3, 1e-5)
    return Trainer(
        model,
        optimizer,
        build_scheduler(optimizer, 5 * max_epochs),
        loaders,
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        checkpoint_dir=tmp_path / "checkpoints",
        guard=HealthGuard(max_consecutive, tmp_path / "nonfinite"),
        **kwargs,
    )


def _batch(loaders):
    return next(iter(loaders["train"]))


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_nan_in_a_batch_skips_the_step_counts_it_and_saves_the_batch(loaders, tmp_path):
    trainer = _trainer(loaders, tmp_path)
    batch = _batch(loaders)
    trainer.train_step(batch)
    assert trainer.state.global_step == 1 and trainer.guard.total == 0
    before = _params(trainer.model)
    moments = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
    bad = dict(batch, hit_x=batch["hit_x"].clone())
    bad["hit_x"][0, 0, 0] = math.nan
    assert not math.isfinite(trainer.train_step(bad)["loss"])
    assert all(
        torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True)
    )  # no update, not even weight decay
    assert all(
        torch.equal(a, s["exp_avg"]) for a, s in zip(moments, trainer.optimizer.state.values(), strict=True)
    )  # nor of the optimiser's moments
    assert trainer.guard.total == 1 and trainer.state.global_step == 1
    saved = torch.load(tmp_path / "nonfinite" / "nonfinite_step1.pt", weights_only=False)
    assert torch.isnan(saved["batch"]["hit_x"]).sum() == 1 and "model" in saved
    trainer.train_step(batch)
    assert trainer.state.global_step == 2 and trainer.guard.consecutive == 0


def test_repeated_nan_batches_stop_training_naming_the_first_module(loaders, tmp_path):
    trainer = _trainer(loaders, tmp_path, max_consecutive=2)
    bad = _batch(loaders)
    bad["hit_x"][:, 0, 1] = math.nan
    trainer.train_step(bad)
    with pytest.raises(
        NonFiniteTrainingError,
        match=r"2 consecutive .*first module whose output went non-finite is 'input_norm'",
    ):
        trainer.train_step(bad)


def test_a_module_emitting_nan_is_named(loaders, tmp_path):
    trainer = _trainer(loaders, tmp_path, max_consecutive=3)
    trainer.model.encoder.layers[1].register_forward_hook(lambda module, inputs, output: output * math.nan)
    batch = _batch(loaders)
    for _ in range(2):
        trainer.train_step(batch)
    assert trainer.guard.consecutive == 2
    with pytest.raises(NonFiniteTrainingError, match=r"'encoder\.layers\.1'"):
        trainer.train_step(batch)
    assert trainer.guard.total == 3 and trainer.state.global_step == 0


def test_a_backward_only_failure_names_the_parameter(loaders, tmp_path):
    trainer = _trainer(loaders, tmp_path, max_consecutive=1)
    trainer.model.decoder.queries.register_hook(lambda grad: grad * math.nan)
    with pytest.raises(
        NonFiniteTrainingError,
        match=r"forward pass is finite; the first non-finite gradient is in 'decoder\.queries'",
    ):
        trainer.train_step(_batch(loaders))


def test_resuming_from_a_checkpoint_continues_exactly(loaders, tmp_path):
    straight = _trainer(loaders, tmp_path / "a", max_epochs=2)
    straight.fit()
    first = _trainer(loaders, tmp_path / "b", max_epochs=2)
    first.max_epochs = 1  # stop after one epoch, as a killed run would have
    first.fit()
    state = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert state["trainer"]["epoch"] == 1
    resumed = _trainer(loaders, tmp_path / "c", max_epochs=2, seed=123)  # different init: must be overwritten
    resumed.load_state_dict(state)
    resumed.state.finished = False
    resumed.fit()
    assert resumed.state.epoch == 2 and resumed.state.global_step == straight.state.global_step
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    metrics, _ = straight.evaluate("test")
    assert math.isfinite(metrics["test/loss"]) and 0 <= metrics["test/track_efficiency"] <= 1


def test_bucketed_and_plain_batches_give_the_same_per_event_outputs(loaders, tmp_path):
    """Bucketing and block-wise reading change which events share a batch, never what is computed."""
    torch.manual_seed(0)
    model = make_model(input_size=len(FEATURES)).eval()
    dataset = loaders["train"].dataset
    plain = make_loader(dataset, 7, shuffle=False, bucket_by_hits=False)
    bucketed = make_loader(dataset, 16, shuffle=True, seed=3, num_workers=2)

    def per_event(loader) -> dict[int, dict[str, torch.Tensor]]:
        out = {}
        with torch.no_grad():
            for batch in loader:
                result = model(batch)
                loss = model.loss(result, batch)  # exercises matching on every batch
                assert torch.isfinite(loss["loss"])
                for i, event in enumerate(batch["event_index"].tolist()):
                    n = int(batch["hit_valid"][i].sum())
                    out[event] = {
                        "valid": result["track_valid_logit"][i],
                        "regression": result["track_regression"][i],
                        "hits": result["track_hit_logit"][i, :, :n],
                    }
        return out

    a, b = per_event(plain), per_event(bucketed)
    assert a.keys() == b.keys() and len(a) == len(dataset)
    for event in a:
        for key in a[event]:
            torch.testing.assert_close(a[event][key], b[event][key], atol=1e-5, rtol=1e-4)


def test_checkpoints_are_also_written_by_time_inside_an_epoch(loaders, tmp_path):
    trainer = _trainer(loaders, tmp_path, checkpoint_every_minutes=1e-9)  # by default every 2 minutes
    trainer.train_epoch()
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["trainer"]
    assert saved["epoch"] == 0 and saved["step_in_epoch"] == len(loaders["train"].batch_sampler) > 1


def test_a_checkpoint_that_cannot_be_written_is_one_warning_naming_it_and_training_goes_on(
    loaders, tmp_path, caplog
):
    blocker = tmp_path / "checkpoints" / "last.pt.tmp"
    blocker.mkdir(parents=True)  # where last.pt is written first: no file can be made there

    def unblock_at_step_3(metrics: dict, step: int) -> None:
        if step == 3:
            blocker.rmdir()

    trainer = _trainer(loaders, tmp_path, checkpoint_every_steps=1, log=unblock_at_step_3, log_every_steps=1)
    with caplog.at_level(logging.INFO, logger="muonreg.training.loop"):
        trainer.fit()
    assert trainer.state.finished and trainer.state.epoch == 2  # trained to the end
    last = tmp_path / "checkpoints" / "last.pt"
    messages = [r.getMessage() for r in caplog.records if str(last) in r.getMessage()]
    assert messages == [
        f"cannot write the checkpoint {last} (Is a directory); training goes on, and a kill would lose "
        "what was trained since the last checkpoint written",
        f"checkpoint {last} written again",
    ]
    assert load_checkpoint(last)["trainer"]["epoch"] == 2


def test_an_unknown_optimized_metric_fails_before_training_naming_the_choices(loaders, tmp_path):
    trainer = _trainer(loaders, tmp_path, max_epochs=1, monitor="val/resolution_of_everything")
    before = torch.get_rng_state()
    with pytest.raises(
        ConfigError, match=r"optimized_metric='val/resolution_of_everything'.*val/qpt_resolution"
    ):
        trainer.fit()
    assert trainer.state.step_in_epoch == 0 and not (tmp_path / "checkpoints").exists()  # nothing trained
    assert torch.equal(torch.get_rng_state(), before)  # the check leaves no trace on what follows


def test_a_physical_metric_drives_early_stopping(loaders, tmp_path):
    trainer = _trainer(loaders, tmp_path, max_epochs=1, monitor="val/qpt_resolution")
    best = trainer.fit()
    assert best == trainer.state.best and (math.isnan(best) or best > 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_training_loop_never_makes_the_host_wait_for_the_gpu(loaders, tmp_path):
    """No host sync in muonreg's code (loop, model, tasks) on an ordinary step; bench/gpu_check.py counts
    them for the default configuration, torch's own included."""
    device = torch.device("cuda")
    model = make_model(input_size=len(FEATURES)).to(device)
    optimizer = build_optimizer(model, 1e-3, 1e-5)
    trainer = Trainer(
        model,
        optimizer,
        build_scheduler(optimizer, 10),
        loaders,
        device=device,
        checkpoint_dir=tmp_path / "checkpoints",
        guard=HealthGuard(3, tmp_path / "nonfinite"),
    )
    batches = [to_device(b, device) for b in loaders["train"]]
    trainer.train_step(batches[0])  # first use: allocations, library handles
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for batch in batches[1:4]:
                trainer.train_step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    in_loop = [f"{w.filename}:{w.lineno}" for w in caught if "/muonreg/" in w.filename]
    assert in_loop == []
    trainer.save("last.pt")  # reads the flags of every step: all were kept
    assert trainer.state.global_step == 4 and trainer.guard.total == 0


@pytest.mark.parametrize("standardize", [True, False])
def test_input_standardisation_can_be_switched_off(loaders, standardize):
    """`model.standardize_inputs=false` (the ablation's starting point) keeps the inputs as scaled."""
    from muonreg.training.setup import fit_normalizations

    model = make_model(input_size=len(FEATURES))
    fit_normalizations(model, loaders["train"].dataset, FIELDS, standardize_inputs=standardize)
    identity = bool((model.input_norm.mean == 0).all() and (model.input_norm.std == 1).all())
    assert identity != standardize
    # the targets are normalised on every training event either way (not on one: a positional-argument
    # slip once fitted both normalisations on a single event)
    dataset = loaders["train"].dataset
    items = [dataset[i] for i in range(len(dataset))]
    eta = np.concatenate([it["particle_truthMuon_eta"][it["particle_valid"]] for it in items])
    assert model.regression_task.space.mean[FIELDS.index("truthMuon_eta")].item() == pytest.approx(
        eta.mean(), abs=1e-5
    )


def test_auto_loader_workers_follow_the_cores_this_process_may_use():
    assert loader_workers(3) == 3 and loader_workers(0) == 0
    cores = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cores)})  # as a batch job given one core
        assert usable_cores() == 1
        assert loader_workers("auto") == 0
    finally:
        os.sched_setaffinity(0, cores)
    assert usable_cores() == len(cores)
    assert loader_workers("auto") == (0 if len(cores) <= 2 else LOADER_WORKERS)

"""Hyperparameter search (hydra/sweeper=optuna): the search space, a trial a killed search left
running, and a real two-trial search on the smoke config, resumed by running it again."""

from __future__ import annotations

import subprocess

import mlflow
import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from test_train_e2e import ENV, ROOT, command

from hydra_plugins.muonreg_optuna_sweeper.optuna_sweeper import OptunaSweeper, search_space
from muonreg.compare import compare


def test_hydra_sweeps_become_optuna_distributions():
    params = {
        "trainer.lr": "tag(log, interval(1e-4, 1e-2))",
        "assignment_threshold": "interval(0.05, 0.5)",
        "model.dim": "choice(32, 64)",
        "trainer.batch_size": "range(16, 65, 16)",
        "model.decoder_layers": "int(interval(1, 4))",
    }
    space, fixed = search_space(params, ["+experiment=search", "seed=0,1", "pooling=fit"])
    assert space == {
        "trainer.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "assignment_threshold": FloatDistribution(0.05, 0.5),
        "model.dim": CategoricalDistribution([32, 64]),
        "trainer.batch_size": IntDistribution(16, 64, step=16),
        "model.decoder_layers": IntDistribution(1, 4),
        "seed": CategoricalDistribution([0, 1]),  # a command-line sweep is searched too
    }
    assert fixed == ["+experiment=search", "pooling=fit"]
    with pytest.raises(ValueError, match=r"trainer\.lr"):
        search_space({"trainer.lr": "0.001"}, [])


def test_a_trial_left_running_is_failed_and_its_parameters_tried_again():
    study = optuna.create_study()
    space = {"x": FloatDistribution(0.0, 1.0)}
    stale = study.ask(space)  # a search killed while this trial trained
    OptunaSweeper()._retry_stale(study)
    assert study.trials[stale.number].state == TrialState.FAIL
    again = study.ask(space)
    assert again.params == stale.params and again.number != stale.number


@pytest.mark.slow
def test_two_trial_search_resumed_under_one_parent(tmp_path):
    overrides = [
        "+experiment=search",
        "trainer.max_epochs=1",
        "trainer.num_workers=0",
        "optimized_metric=val/loss",  # the smoke tracker finds too few tracks for a q/pT resolution
    ]
    for trials in (2, 3):  # the same command again, with a larger budget, continues the study
        cmd = command(
            tmp_path, tmp_path / "data", *overrides, f"hydra.sweeper.n_trials={trials}", multirun=True
        )
        result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
    sweep_dir = tmp_path / "multirun" / "search" / "search"
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["trials"] == {"COMPLETE": 3, "FAIL": 0, "PRUNED": 0}
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("search").experiment_id
    parents = client.search_runs([experiment], "tags.`muonreg.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(c.info.status for c in children) == ["FINISHED"] * 3
    assert len({c.data.params["trainer.lr"] for c in children}) == 3  # a resumed search draws new values
    best = min(children, key=lambda c: c.data.metrics["best/val/loss"])
    assert best.data.metrics["best/val/loss"] == pytest.approx(results["best_value"])
    _, out = compare(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="search", out=tmp_path / "r"
    )
    assert f"run {best.info.run_id}" in (out / "compare.md").read_text()

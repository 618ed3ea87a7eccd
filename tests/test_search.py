"""Hyperparameter search (hydra/sweeper=optuna): the search space, a trial a killed search left
running, and a real two-trial search on the smoke config, resumed by running it again."""

from __future__ import annotations

import subprocess
import time

import mlflow
import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.muonreg_optuna_sweeper.optuna_sweeper import OptunaSweeper, search_space, trials_done
from muonreg.compare import compare

from train_cli import ENV, ROOT, command


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
    study.tell(study.ask(space), 0.5)
    stale = study.ask(space)  # a search killed while this trial trained
    OptunaSweeper()._retry_stale(study)
    assert study.trials[stale.number].state == TrialState.FAIL
    assert trials_done(study) == 1  # the killed trial is not done: its retry takes its place
    again = study.ask(space)
    assert again.params == stale.params and again.number != stale.number
    study.tell(again, 0.25)
    assert trials_done(study) == 2


def _search(root, data, *overrides: str) -> subprocess.Popen:
    cmd = command(root, data, "+experiment=search", *overrides, multirun=True)
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_killed_smoke_search_is_finished_by_the_same_command_and_continued_by_a_larger_budget(tmp_path):
    """`debug=smoke` shrinks the search too (one epoch, a metric a smoke run has); a search killed -9
    in its second trial is finished by the same command: the trial runs again and continues its run."""
    sweep_dir = tmp_path / "multirun" / "search" / "search"
    killed = _search(tmp_path, tmp_path / "data", "hydra.sweeper.n_trials=2")
    while not (sweep_dir / "1" / "run.json").is_file() and killed.poll() is None:  # trial 1 trains
        time.sleep(0.05)
    killed.kill()
    killed.communicate()
    outputs = []
    for trials in (2, 3):  # the same command again; then a larger budget continues the study
        search = _search(tmp_path, tmp_path / "data", f"hydra.sweeper.n_trials={trials}")
        outputs.append("".join(search.communicate(timeout=900)))
        assert search.returncode == 0, outputs[-1][-4000:]
    assert "trial 1 was left running by an earlier search: marked FAIL, its parameters queued" in outputs[0]
    assert "1 of 2 trials done" in outputs[0]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["trials"] == {"COMPLETE": 3, "FAIL": 1, "PRUNED": 0}  # the FAIL: trial 1, killed, rerun
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("search").experiment_id
    parents = client.search_runs([experiment], "tags.`muonreg.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(c.info.status for c in children) == ["FINISHED"] * 3  # the killed trial's run continued
    assert {(c.data.params["trainer.max_epochs"], c.data.params["optimized_metric"]) for c in children} == {
        ("1", "val/loss")
    }
    assert len({c.data.params["trainer.lr"] for c in children}) == 3  # a resumed search draws new values
    best = min(children, key=lambda c: c.data.metrics["best/val/loss"])
    assert best.data.metrics["best/val/loss"] == pytest.approx(results["best_value"])
    _, out = compare(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="search", out=tmp_path / "r"
    )
    assert f"run {best.info.run_id}" in (out / "compare.md").read_text()


@pytest.mark.slow
def test_a_search_whose_every_trial_failed_ends_with_one_line_saying_why(tmp_path):
    search = _search(tmp_path, tmp_path / "data", "hydra.sweeper.n_trials=2", "seed=-1,-2")
    _, stderr = search.communicate(timeout=300)
    assert search.returncode == 1 and "Traceback" not in stderr, stderr
    (error,) = [line for line in stderr.splitlines() if line.startswith("error: Optuna")]
    assert error.startswith("error: Optuna study 'search': none of its 2 trials completed (trial 0: seed=-")
    assert "; trial 1: seed=-" in error and "must be an integer from 0 to" in error

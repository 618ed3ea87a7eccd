"""`hydra/sweeper=optuna`: a hyperparameter search with Optuna, one Hydra job per trial.

Hydra's own Optuna sweeper pins Optuna < 3, whose database storage fails on the SQLAlchemy 2 that
MLflow needs, so a search could not be stored and resumed; this sweeper is built on the Optuna in
pyproject.toml. The search space is `hydra.sweeper.params`, in Hydra's sweep syntax:
`interval(a, b)` (float), `tag(log, interval(a, b))` (log-uniform), `int(interval(a, b))`,
`range(a, b, step)` and `choice(...)`; a sweep on the command line (`seed=0,1`) is searched too.

The study is stored in `storage` under `study_name`, so rerunning the same command continues it up
to `n_trials`. A trial left RUNNING by a killed search is marked FAIL and its parameters are tried
first, as a trial that takes its place in `n_trials`: with `resume=auto` that job continues the
killed run from its checkpoint, so the same command finishes the search it started. One search
process per study at a time. The best trial is written to `<sweep dir>/optimization_results.yaml`;
a search in which no trial completed ends with one line saying why each failed.
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from muonreg.errors import ReportedError, one_line

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
RETRY_OF = "muonreg.retry_of"  # user attribute of a trial that tries again a killed search's trial


# No `from __future__ import annotations` here: Hydra loads plugin modules outside sys.modules, where a
# dataclass cannot resolve string annotations.
@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.muonreg_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    direction: str = "minimize"  # the task function returns the value to optimise
    study_name: str = "${tracking.experiment}"
    storage: str | None = "sqlite:///${hydra.sweep.dir}/optuna.db"  # null: in memory, not resumable
    n_trials: int = 20  # in all, counting the trials of earlier runs of this study
    n_jobs: int = 1  # trials launched together (with hydra/launcher=joblib, run in parallel)
    seed: int | None = None  # the TPE sampler's seed
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="muonreg")


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one swept override (`key=interval(1e-4, 1e-2)` and the like)."""
    sweep = override.value()
    key = override.get_key_element()
    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(sweep, RangeSweep):
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(sweep.step))
        return CategoricalDistribution(values)
    if isinstance(sweep, IntervalSweep):
        log_scale = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(sweep.start, sweep.end, log=log_scale)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    raise ValueError(f"hydra.sweeper.params: {key}={override.input_line} is not a sweep Optuna can search")


def search_space(
    params: dict[str, str], arguments: list[str]
) -> tuple[dict[str, BaseDistribution], list[str]]:
    """(the distributions to search, the fixed overrides every trial gets)."""
    parser = OverridesParser.create()
    space: dict[str, BaseDistribution] = {}
    fixed = []
    for override in parser.parse_overrides([f"{k}={v}" for k, v in params.items()]):
        if not override.is_sweep_override():
            raise ValueError(
                f"hydra.sweeper.params.{override.get_key_element()}={override.value()!r} is one value, "
                "not a search range: set it as a plain override instead"
            )
        space[override.get_key_element()] = distribution(override)
    for override in parser.parse_overrides(arguments):
        if override.is_sweep_override():
            space[override.get_key_element()] = distribution(override)
        else:
            fixed.append(override.input_line)
    return space, fixed


def trials_done(study: optuna.Study) -> int:
    """Finished trials, where a killed trial and the trial that tried it again count once."""
    retries = sum(RETRY_OF in t.user_attrs for t in study.get_trials(deepcopy=False))
    return sum(t.state in FINISHED for t in study.get_trials(deepcopy=False)) - retries


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = OptunaSweeperConf(**settings)
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> optuna.Study:
        s = self.settings
        space, fixed = search_space(dict(s.params or {}), arguments)
        if not space:
            raise ValueError(
                "hydra/sweeper=optuna needs hydra.sweeper.params (or a sweep on the command line)"
            )
        if s.storage and s.storage.startswith("sqlite:///"):
            Path(s.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            study_name=s.study_name, storage=s.storage, direction=s.direction, load_if_exists=True
        )
        # Seeded by the trials so far: a resumed search does not draw its first trials' values again.
        study.sampler = optuna.samplers.TPESampler(
            seed=None if s.seed is None else s.seed + len(study.trials)
        )
        self._retry_stale(study)
        done = trials_done(study)
        failures: dict[int, str] = {}
        log.info(
            "Optuna study %r (%s): %d of %d trials done; searching %s",
            s.study_name, s.storage or "in memory", done, s.n_trials, ", ".join(space),
        )  # fmt: skip
        while done < s.n_trials:
            trials = [study.ask(space) for _ in range(min(s.n_jobs, s.n_trials - done))]
            batch = [fixed + [f"{k}={v}" for k, v in t.params.items()] for t in trials]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            for trial, result in zip(trials, results, strict=True):
                value = result.return_value if result.status == JobStatus.COMPLETED else math.nan
                if isinstance(value, int | float) and math.isfinite(value):
                    study.tell(trial, float(value))
                else:
                    failures[trial.number] = self._why(result)
                    log.warning("trial %d failed: %s; marked FAIL", trial.number, failures[trial.number])
                    study.tell(trial, state=TrialState.FAIL)
            done += len(trials)
        self._write_results(study, failures)
        return study

    def _why(self, result: JobReturn) -> str:
        """Why a trial did not complete, in words: its error, or its metric that was never finite."""
        if result.status == JobStatus.COMPLETED:
            return (
                f"its {self.config.get('optimized_metric', 'value')} was never finite ({result.return_value})"
            )
        return one_line(result._return_value).removeprefix("error: ")  # Hydra keeps the job's exception there

    def _retry_stale(self, study: optuna.Study) -> None:
        """A trial still RUNNING belongs to a search that was killed: fail it and try its parameters again."""
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.info(
                "trial %d was left running by an earlier search: marked FAIL, its parameters queued",
                trial.number,
            )
            study.tell(trial.number, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})

    def _write_results(self, study: optuna.Study, failures: dict[int, str]) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            reasons = "; ".join(f"trial {n}: {why}" for n, why in failures.items()) or "in earlier runs"
            raise ReportedError(
                f"error: Optuna study {study.study_name!r}: none of its {trials_done(study)} trials completed "
                f"({reasons}); job logs in {self.config.hydra.sweep.dir}"
            )
        best = study.best_trial
        results = {
            "study_name": study.study_name,
            "direction": self.settings.direction,
            "best_trial": best.number,
            "best_value": best.value,
            "best_params": best.params,
            "trials": {state.name: sum(t.state == state for t in study.trials) for state in FINISHED},
        }
        out = Path(self.config.hydra.sweep.dir) / "optimization_results.yaml"
        out.write_text(yaml.safe_dump(results, sort_keys=False))
        log.info("best trial %d: %s = %.5g with %s (%s)", best.number, self.config.get("optimized_metric", "value"),
                 best.value, best.params, out)  # fmt: skip

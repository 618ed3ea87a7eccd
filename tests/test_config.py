"""Every config group option composes and validates; every bad value fails at start naming its key."""

import itertools
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig

from muonreg.config import ConfigError, feature_names, flatten, project_root, validate
from muonreg.data.schema import HIT_FEATURES

from conftest import random_events, write_reference_dataset

CONF = str(project_root() / "conf")
GROUPS = {
    "data/features": ["base", "eta"],
    "tasks": ["weighted_pooling", "object_regression"],
    "pooling": ["all", "weighted", "extrema", "mean", "station", "fit", "fit_station", "fit_local"],
    "threshold": ["hard", "soft"],
    "inverse_fields": ["pt", "none", "qpt"],
    "trainer": ["cpu", "gpu"],
    "model": ["reference", "hit_filter"],
    "data": ["simulated", "pileup"],
}


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_group_options_on_disk_are_the_tested_ones():
    for group, options in GROUPS.items():
        on_disk = sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))
        assert on_disk == sorted(options), group


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes_and_validates(group, option):
    cfg = _compose(f"{group}={option}", "debug=smoke")
    validate(cfg)
    assert cfg.trainer.max_epochs == 1  # debug=smoke applied on top


def test_features_groups_derive_the_input_list():
    base, eta = feature_names(_compose("data/features=base")), feature_names(_compose())
    assert len(base) == 22 and eta == [*base, "eta"]


def test_top_level_keys_and_combinations():
    cfg = _compose("assignment_threshold=0.3", "seed=7", "tasks=object_regression", "inverse_fields=qpt")
    validate(cfg)
    assert cfg.assignment_threshold == 0.3 and cfg.seed == 7
    for a, b in itertools.product(GROUPS["pooling"], GROUPS["threshold"]):
        validate(_compose(f"pooling={a}", f"threshold={b}"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("assignment_threshold=1.5", r"assignment_threshold=1\.5 must be a number strictly between 0 and 1"),
        ("assignment_threshold=0", r"assignment_threshold=0 must be"),
        (
            "inverse_fields.inverse=[truthMuon_ptt]",
            r"inverse_fields\.inverse=.*'truthMuon_ptt', which is not a target",
        ),
        ("inverse_fields=qpt", None),
        (
            "data.features.derived=[r,etaa]",
            r"data\.features\.derived=.*\['etaa'\]; allowed: \['r', 's', 'theta', 'phi', 'eta'\]",
        ),
        (
            "data.features.columns=[spacePoint_time,spacePoint_drift]",
            r"data\.features\.columns=.*\['spacePoint_drift'\]",
        ),
        (
            "pooling.ops=[mean,median]",
            r"pooling\.ops=.*subset of \['mean', 'sum', 'max', 'min', 'station', 'fit'\]",
        ),
        ("model.num_queries=1", r"model\.num_queries=1 must be at least data\.max_particles=2"),
        ("model.hit_mask.threshold=1", r"model\.hit_mask\.threshold=1 must be strictly between 0 and 1"),
        ("trainer.device=tpu", r"trainer\.device='tpu' must be auto, cpu, cuda or cuda:N"),
        ("trainer.batch_size=0", r"trainer\.batch_size=0 must be a positive integer"),
        (
            "trainer.num_workers=two",
            r"trainer\.num_workers='two' must be auto or a number of loader processes",
        ),
        ("trainer.num_workers=-1", r"trainer\.num_workers=-1 must be auto or a number"),
        ("trainer.num_workers=3", None),
        (
            "evaluation.precision=fp16",
            r"evaluation\.precision='fp16' must be one of \['auto', 'fp32', 'bf16'\]",
        ),
        ("data.path=/nonexistent/dir", r"data\.path='/nonexistent/dir' is not a dataset"),
        ("resume=/no/such.pt", r"resume='/no/such\.pt' must be null, auto or the path"),
        ("seed=-1", r"seed=-1 must be an integer from 0 to 4294967295"),
        ("seed=4294967296", r"seed=4294967296 must be an integer"),
        ("pooling=[]", r"pooling selects no option \(e\.g\. pooling=\[\]\); choose one of \['all', "),
        ("data/features=[]", r"data/features selects no option"),
        (
            "evaluation.heldout.seed=12345",
            r"evaluation\.heldout\.seed=12345 is also data\.simulation\.seed: the two would share their events",
        ),
        (
            "evaluation.validation.events=-1",
            r"evaluation\.validation\.events=-1 must be a number of events >= 0",
        ),
        ("evaluation.heldout.seed=1.5", r"evaluation\.heldout\.seed=1\.5 must be an integer"),
        (
            "evaluation.heldout.alignment_seed=-2",
            r"evaluation\.heldout\.alignment_seed=-2 must be null or a seed",
        ),
        ("evaluation.heldout.alignment_seed=null", None),
        (
            "evaluation.heldout.energy_loss_shift=0.7",
            r"energy_loss_shift=0\.7 must be a relative shift between",
        ),
        ("evaluation.heldout.energy_loss_shift=-0.03", None),
    ],
)
def test_invalid_values_name_their_key(override, message):
    cfg = _compose(override)
    if message is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_data_path_must_be_a_dataset(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path=.* is not a dataset in the hepattn ATLAS-muon layout"):
        validate(_compose(f"data.path={tmp_path}"))


def test_validation_and_heldout_sets_never_share_their_events():
    cfg = _compose("evaluation.validation.events=100", "evaluation.validation.seed=34567")
    with pytest.raises(
        ConfigError, match=r"evaluation\.heldout\.seed=34567 is also evaluation\.validation\.seed"
    ):
        validate(cfg)
    validate(_compose("evaluation.validation.events=0", "evaluation.validation.seed=34567"))  # the val split


def test_a_dataset_without_a_feature_column_says_so_and_how_to_train_without_it(tmp_path):
    hits, tracks = random_events(20)
    columns = [c for c in HIT_FEATURES if c != "spacePoint_driftR"]
    path = write_reference_dataset(tmp_path / "ds", hits, tracks, hit_columns=columns)
    with pytest.raises(ConfigError) as err:
        validate(_compose(f"data.path={path}"))
    message = str(err.value)
    assert message.startswith(f"data.path={str(path)!r} has no hit column 'spacePoint_driftR'")
    assert "data.features.columns uses" in message and "\n" not in message
    fix = re.search(r"train without it: '(.*)'$", message).group(1)
    validate(_compose(f"data.path={path}", fix))  # the override it gives is the fix


def test_unknown_group_option_and_key_are_hydra_errors_naming_them():
    with pytest.raises(
        MissingConfigException,
        match=r"Could not find 'threshold/medium'\s+Available options in 'threshold':\s+hard\s+soft",
    ):
        _compose("threshold=medium")
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'assignment_treshold'"):
        _compose("assignment_treshold=0.2")


def test_flatten_gives_dotted_params():
    flat = flatten(_compose("assignment_threshold=0.2"))
    assert flat["assignment_threshold"] == "0.2"
    assert (
        flat["model.dim"] == "32" and flat["pooling.ops"] == "['mean', 'sum', 'max', 'min', 'station', 'fit']"
    )
    assert flat["pooling.local"] == "False" and flat["model.hit_mask.threshold"] == "0.5"
    assert flat["paths.root"] == str(project_root())


def test_cluster_launcher_config_composes():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 720


@pytest.mark.parametrize(
    "experiment",
    ["threshold_sweep", "inverse_pt_ablation", "full_grid", "regression_ablation", "pooling_study"],
)
@pytest.mark.parametrize("budget", ["cpu", "gpu"])
def test_named_studies_compose_with_both_budgets(experiment, budget):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[f"+experiment={experiment}", f"budget={budget}"],
            return_hydra_config=True,
        )
    validate(cfg)
    assert cfg.tracking.experiment == experiment
    assert "seed" in cfg.hydra.sweeper.params
    assert cfg.trainer.batch_size == (200 if budget == "gpu" else 100)
    assert cfg.data.simulation.events == (1_000_000 if budget == "gpu" else 60_000)
    assert cfg.trainer.max_epochs == (
        30 if budget == "gpu" else 6
    )  # the CPU study budget: 6, not the default 4

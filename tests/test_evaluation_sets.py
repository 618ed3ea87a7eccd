"""The validation and held-out sets: simulated apart from the training data, on the right detector, cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from muonreg.config import project_root, validate
from muonreg.data.format import read_metadata
from muonreg.data.simulate import SimulationConfig, detector_alignment
from muonreg.training.setup import build_data, evaluation_sets

from conftest import random_events, write_reference_dataset


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    validate(cfg)
    return cfg


def _simulation(path: Path) -> tuple[int, SimulationConfig]:
    parameters = read_metadata(path)["processing_parameters"]
    return parameters["seed"], SimulationConfig(**parameters["simulator"])


def test_validation_is_the_training_detector_and_heldout_another(tmp_path):
    cfg = _cfg(
        f"paths.root={tmp_path}",
        "data.simulation.events=40",
        "data.simulation.files=1",
        "evaluation.validation.events=30",
        "evaluation.heldout.events=30",
        "evaluation.heldout.energy_loss_shift=0.05",
    )
    data = build_data(cfg, progress=False)
    sets = evaluation_sets(cfg, data, progress=False)
    assert sorted(sets) == ["heldout", "validation"] and all(len(s) == 30 for s in sets.values())
    training = detector_alignment(*_simulation(data.path)).offsets
    seed, config = _simulation(sets["validation"].reader.path)
    assert seed == 23456 and config.energy_loss_mpv == SimulationConfig().energy_loss_mpv
    np.testing.assert_array_equal(detector_alignment(seed, config).offsets, training)
    seed, config = _simulation(sets["heldout"].reader.path)
    assert seed == 34567 and config.alignment_seed == 45678
    assert not np.allclose(detector_alignment(seed, config).offsets, training)  # another misalignment draw
    assert config.energy_loss_mpv == SimulationConfig().energy_loss_mpv * 1.05
    assert config.energy_loss_width == SimulationConfig().energy_loss_width * 1.05
    first = [s.reader.read(0).tracks for s in (data.datasets["train"], *sets.values())]
    assert not any(np.array_equal(first[0], other) for other in first[1:])  # their own events
    again = evaluation_sets(cfg, data, progress=False)  # cached: the same directories, nothing simulated
    assert {k: s.reader.path for k, s in again.items()} == {k: s.reader.path for k, s in sets.items()}


def test_a_dataset_of_ones_own_is_validated_on_its_val_split_and_has_no_heldout(tmp_path):
    hits, tracks = random_events(50)
    path = write_reference_dataset(tmp_path / "ds", hits, tracks)
    cfg = _cfg(
        f"paths.root={tmp_path}", f"data.path={path}", "data/features=base", "data.features.derived=[]"
    )
    data = build_data(cfg, progress=False)
    sets = evaluation_sets(cfg, data, progress=False)
    assert list(sets) == ["validation"] and sets["validation"] is data.datasets["val"]

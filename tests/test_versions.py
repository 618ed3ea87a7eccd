"""Cached datasets and references are keyed on physics versions: code changes must bump them."""

import ast
import hashlib
from pathlib import Path

import muonreg
from muonreg import versions
from muonreg.reco.energy_loss import calibration_version

ROOT = Path(muonreg.__file__).parent
SIMULATOR_FILES = ["detector.py", "data/simulate.py"]
FIT_FILES = ["detector.py", "reco/fit.py", "reco/energy_loss.py", "reco/energy_loss.json"]


def digest(files: list[str]) -> str:
    """Digest of what the code does: Python by its syntax tree (comments and layout do not count)."""
    h = hashlib.sha256()
    for name in files:
        text = (ROOT / name).read_text()
        h.update(ast.dump(ast.parse(text)).encode() if name.endswith(".py") else text.encode())
    return h.hexdigest()[:16]


def test_simulator_change_bumps_its_version():
    assert digest(SIMULATOR_FILES) == versions.SIMULATOR_DIGEST, (
        "the simulator's code changed: bump SIMULATOR_VERSION in muonreg/versions.py, recalibrate the "
        "energy-loss table (python -m muonreg.reco.energy_loss) and set "
        f"SIMULATOR_DIGEST = {digest(SIMULATOR_FILES)!r}"
    )


def test_fit_change_bumps_its_version():
    assert digest(FIT_FILES) == versions.FIT_DIGEST, (
        f"the reference fit's code changed: bump FIT_VERSION in muonreg/versions.py and set "
        f"FIT_DIGEST = {digest(FIT_FILES)!r}"
    )


def test_energy_loss_table_was_calibrated_on_this_simulator():
    assert calibration_version() == versions.SIMULATOR_VERSION, (
        "muonreg/reco/energy_loss.json was calibrated on another simulator version: "
        "python -m muonreg.reco.energy_loss"
    )


def test_cached_dataset_is_rebuilt_when_the_physics_version_changes(tmp_path, monkeypatch):
    from muonreg.data import cache
    from muonreg.data.format import is_dataset
    from muonreg.data.simulate import SimulationConfig

    config = SimulationConfig()
    first = cache.ensure_simulated(tmp_path, 20, 0, 1, config, progress=False)
    assert cache.ensure_simulated(tmp_path, 20, 0, 1, config, progress=False) == first
    monkeypatch.setattr(cache, "SIMULATOR_VERSION", versions.SIMULATOR_VERSION + 1)
    bumped = cache.ensure_simulated(tmp_path, 20, 0, 1, config, progress=False)
    assert bumped != first and is_dataset(bumped) and is_dataset(first)


def test_cached_reference_is_keyed_on_the_fit_version(tmp_path, monkeypatch):
    from muonreg.data.format import DatasetReader
    from muonreg.data.simulate import write_simulated_dataset
    from muonreg.evaluation import reference

    reader = DatasetReader(write_simulated_dataset(tmp_path / "ds", 10, seed=1, progress=False))
    path = reference.reference_path(reader, [0, 1], tmp_path)
    assert (
        reference.reference_path(reader, [0, 1], tmp_path)
        == path
        != reference.reference_path(reader, [0], tmp_path)
    )
    monkeypatch.setattr(reference, "FIT_VERSION", versions.FIT_VERSION + 1)
    assert reference.reference_path(reader, [0, 1], tmp_path) != path

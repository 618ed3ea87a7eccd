"""Every run logs its best network as an MLflow model: loaded back from a real smoke run (by run and
from the registry), it predicts on stored events exactly what the checkpoint predicts."""

from __future__ import annotations

import subprocess
import sys

import h5py
import mlflow
import numpy as np
import pytest
import torch

from muonreg.data.dataset import MuonEventDataset, collate
from muonreg.data.format import DatasetReader
from muonreg.evaluation.inference import infer
from muonreg.tracking.model import OUTPUTS, stored_events
from muonreg.trained import load_model
from muonreg.training.setup import dataset_path, hit_features, run_splits

from train_cli import ENV, ROOT, client

pytestmark = pytest.mark.slow


def test_pyfunc_model_of_a_run_predicts_as_its_checkpoint(smoke_run, tmp_path):
    root, run_id, best = smoke_run.root, smoke_run.run_id, smoke_run.best
    logged = {a.path for a in client(root).list_artifacts(run_id, "model")}
    assert {"model/MLmodel", "model/artifacts", "model/requirements.txt"} <= logged
    (weights,) = client(root).list_artifacts(run_id, "model/artifacts")
    assert weights.file_size < 2_000_000  # weights and config only: no optimiser state

    model, cfg = load_model(best)
    reader = DatasetReader(dataset_path(cfg))
    test = run_splits(cfg, len(reader))["test"][:7]
    batch = stored_events(reader, test)  # as stored: NaN-padded hits and their counts
    dataset = MuonEventDataset(reader, hit_features(cfg, reader.hit_features, ""), [], 2, indices=test)
    expected = {
        k: v.numpy()
        for k, v in infer(model, collate([dataset[i] for i in range(len(test))]), torch.device("cpu")).items()
    }

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    for uri in (f"runs:/{run_id}/model", "models:/muon-tracker/1"):
        pyfunc = mlflow.pyfunc.load_model(uri)
        got = pyfunc.predict(batch)
        assert set(got) == set(OUTPUTS)
        for key in OUTPUTS:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{uri} {key}")
    assert pyfunc.metadata.signature.inputs.input_names() == ["hits", "num_hits"]

    # the registered model also feeds muonreg.predict (--model-uri): the same predictions
    out = tmp_path / "pred.h5"
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    result = subprocess.run(
        [sys.executable, "-m", "muonreg.predict", "--model-uri", "models:/muon-tracker/1", "--out", str(out), "--no-fit"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["event_index"][: len(test)], test)
        # in one batch with the split's other events (more padding): equal to float rounding
        np.testing.assert_allclose(f["pt"][: len(test)], expected["pt"], rtol=1e-5)
    assert pyfunc.metadata.saved_input_example_info is not None

"""`python -m muonreg.predict` on a real smoke-trained run: the file, read back with plain h5py, holds
exactly what the model predicts in memory on the same events, and the fits of its assigned hits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from muonreg.data.dataset import MuonEventDataset, collate
from muonreg.data.format import DatasetReader
from muonreg.evaluate import evaluate_checkpoint
from muonreg.evaluate import main as evaluate_main
from muonreg.evaluation.inference import SIGMAS, infer
from muonreg.reco.fit import fit_tracks
from muonreg.trained import load_model
from muonreg.training.setup import dataset_path, hit_features, run_splits

from train_cli import ENV, ROOT, runs

pytestmark = pytest.mark.slow
FIELDS = ("eta", "phi", "pt", "q")


def predict(*args: str, root: Path | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"} if root else ENV
    return subprocess.run(
        [sys.executable, "-m", "muonreg.predict", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_predictions_read_back_with_h5py_equal_the_models_in_memory(smoke_run, tmp_path):
    best = smoke_run.best
    out = tmp_path / "pred.h5"
    # batches of 5: several appends; a low hit threshold so that the smoke model's tracks get hits to fit
    result = predict(
        "--checkpoint", str(best), "--split", "val", "--out", str(out), "--batch-size", "5",
        "--hit-threshold", "0.3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.is_file() and not out.with_name("pred.h5.partial").exists()

    model, cfg = load_model(best)
    data = dataset_path(cfg)
    reader = DatasetReader(data)
    val = run_splits(cfg, len(reader))["val"]
    with h5py.File(out) as f:
        got = {k: f[k][:] for k in f if isinstance(f[k], h5py.Dataset)}
        got.update({f"fit/{k}": f["fit"][k][:] for k in f["fit"]})
        attrs = dict(f.attrs)
    assert attrs["format"] == "muonreg-predictions" and attrs["version"] == 2 and attrs["split"] == "val"
    assert all(np.isfinite(got[k]).all() and (got[k] > 0).all() for k in SIGMAS)  # the default has them
    np.testing.assert_array_equal(got["event_index"], val)
    n, q = len(val), model.num_queries
    assert got["valid_probability"].shape == (n, q) and got["hit_probability"].shape == (
        got["num_hits"].sum(),
        q,
    )
    np.testing.assert_array_equal(got["hit_start"], np.cumsum(got["num_hits"]) - got["num_hits"])

    # the same events, in the same batches, through the model in memory
    dataset = MuonEventDataset(reader, hit_features(cfg, reader.hit_features, ""), [], 2, indices=val)
    for start in range(0, n, 5):
        items = [dataset[i] for i in range(start, min(start + 5, n))]
        preds = {k: v.numpy() for k, v in infer(model, collate(items), torch.device("cpu")).items()}
        for k in ("valid_probability", *FIELDS, *SIGMAS):
            np.testing.assert_array_equal(got[k][start : start + len(items)], preds[k], err_msg=k)
        for b, e in enumerate(range(start, start + len(items))):
            h0, nh = got["hit_start"][e], got["num_hits"][e]
            np.testing.assert_array_equal(
                got["hit_probability"][h0 : h0 + nh], preds["hit_probability"][b, :, :nh].T
            )

    # each event maps back to its stored row; the fits are those of the hits the file calls assigned
    files = [Path(attrs["dataset"]) / name for name in attrs["files"]]
    fitted = 0
    for e in range(n):
        with h5py.File(files[got["file_index"][e]]) as f:
            hits = f["hits"][got["row"][e], : got["num_hits"][e]]
        np.testing.assert_array_equal(hits, reader.read(int(val[e])).hits)
        h0, nh = got["hit_start"][e], got["num_hits"][e]
        for j in range(q):
            assigned = got["hit_probability"][h0 : h0 + nh, j] >= 0.3
            assert got["num_assigned"][e, j] == assigned.sum()
            if got["fit/ok"][e, j]:
                ref = fit_tracks([hits[assigned]], reader.hit_index, robust=True)
                for k in (*FIELDS, "chi2_ndf"):
                    np.testing.assert_allclose(got[f"fit/{k}"][e, j], ref[k][0], rtol=1e-5, err_msg=k)
                fitted += 1
            else:
                assert np.isnan(got["fit/pt"][e, j])
    assert fitted > 0


def test_predict_by_run_id_and_one_line_errors(smoke_run, tmp_path):
    root, best, run_id = smoke_run.root, smoke_run.best, smoke_run.run_id
    out = tmp_path / "sub" / "test.h5"
    result = predict("--run-id", run_id, "--out", str(out), "--no-fit", root=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Downloading artifacts" not in result.stderr  # no MLflow progress bar among our lines
    with h5py.File(out) as f:
        assert f.attrs["source"] == f"run {run_id}" and len(f["event_index"]) > 0
        assert not f["fit/ok"][:].any()

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for args, expected in [
        (["--checkpoint", str(bad)], f"error: {bad}: not a checkpoint written by muonreg training"),
        (["--checkpoint", str(tmp_path / "none.pt")], f"error: {tmp_path / 'none.pt'}: no such checkpoint"),
        (["--checkpoint", str(best), "--data", str(tmp_path)], f"error: {tmp_path}: missing"),
        (["--run-id", "0" * 32], "error: MLflow store"),
    ]:
        result = predict(*args, "--out", str(tmp_path / "x.h5"), root=root)
        assert result.returncode == 1 and result.stderr.startswith(expected), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not list(tmp_path.glob("x.h5*"))


def test_evaluate_at_another_hit_working_point_logs_beside_the_runs_own(smoke_run, capfd):
    """`--hit-threshold` at the model's own 0.5 reproduces the run's test metrics exactly; at 0.3 its
    metrics and report go to the run under `test_hit0.3`, the run's own untouched."""
    root, run_id = smoke_run.root, smoke_run.run_id
    uri = f"sqlite:///{root / 'mlflow.db'}"
    before = runs(root)[0].data.metrics
    for threshold in ("0.5", "0.3"):
        evaluate_main(
            ["--run-id", run_id, "--tracking-uri", uri, "--hit-threshold", threshold, "--no-reference"]
        )
    assert "artifacts:" not in capfd.readouterr().err  # MLflow's transfer progress bars are off
    (run,) = runs(root)
    after = run.data.metrics
    assert {k: v for k, v in after.items() if k.startswith("test/")} == {
        k: v for k, v in before.items() if k.startswith("test/")
    }
    same = [k for k in before if k.startswith("test/") and f"test_hit0.5/{k[5:]}" in after]
    assert {"test/track_efficiency", "test/fake_rate", "test/loss"} <= set(same)
    for key in same:
        assert after[f"test_hit0.5/{key[5:]}"] == pytest.approx(before[key], nan_ok=True), key
    assert "test_hit0.3/track_efficiency" in after and "test_hit0.3/hit_purity" in after
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run_id, "evaluation-test_hit0.3")}
    assert "evaluation-test_hit0.3/resolution.md" in artifacts
    with pytest.raises(
        SystemExit, match=r"--hit-threshold 1\.0: a tracker's hit probability strictly between"
    ):
        evaluate_main(["--run-id", run_id, "--tracking-uri", uri, "--hit-threshold", "1"])


def test_evaluate_with_a_changed_configuration_logs_beside_the_runs_own(smoke_run):
    """The test evaluation runs in float32 whatever the training's precision: `--set trainer.precision=bf16`
    gives the run's own test metrics, under their own prefix; `--set evaluation.precision=bf16` evaluates
    in bf16 autocast (on CPU too), the run's own metrics untouched; a key the run lacks or a value that is not YAML fails naming it."""
    root, run_id = smoke_run.root, smoke_run.run_id
    uri = f"sqlite:///{root / 'mlflow.db'}"
    before = runs(root)[0].data.metrics
    for key in ("trainer", "evaluation"):
        evaluate_main(
            ["--run-id", run_id, "--tracking-uri", uri, "--no-reference", "--set", f"{key}.precision=bf16"]
        )
    after = runs(root)[0].data.metrics
    own = {k: v for k, v in before.items() if k.startswith("test/")}
    assert {k: v for k, v in after.items() if k.startswith("test/")} == own
    same = {k[5:]: v for k, v in own.items() if f"test_trainer.precision-bf16/{k[5:]}" in after}
    assert {"track_efficiency", "loss"} <= set(same)
    for key, value in same.items():
        assert after[f"test_trainer.precision-bf16/{key}"] == pytest.approx(value, nan_ok=True), key
    bf16 = after["test_evaluation.precision-bf16/loss"]
    assert np.isfinite(bf16) and bf16 != own["test/loss"]  # bf16 rounding reaches the loss
    with pytest.raises(SystemExit, match=r"--set 'trainer.precison=bf16': expected KEY=VALUE"):
        evaluate_main(["--run-id", run_id, "--tracking-uri", uri, "--set", "trainer.precison=bf16"])
    with pytest.raises(SystemExit, match=r"--set 'trainer.precision=\[bf16': the value is not valid YAML"):
        evaluate_main(["--run-id", run_id, "--tracking-uri", uri, "--set", "trainer.precision=[bf16"])


def test_evaluating_the_heldout_set_again_gives_the_runs_own_figures_and_on_the_training_detector_others(
    smoke_run, tmp_path
):
    """`--split heldout` re-measures what the run logged; with `alignment_seed=null` the same held-out events
    come from the training detector (what the other misalignment costs), under their own prefix."""
    root, best = smoke_run.root, smoke_run.best
    own = runs(root)[0].data.metrics
    metrics, _ = evaluate_checkpoint(best, "heldout", tmp_path / "heldout")
    for key in ("heldout/loss", "heldout/track_efficiency", "heldout/muons_pt5_10", "heldout/paired_muons"):
        assert metrics[key] == own[key], key
    training_detector, _ = evaluate_checkpoint(
        best, "heldout", tmp_path / "aligned", overrides=["evaluation.heldout.alignment_seed=null"]
    )
    prefix = "heldout_evaluation.heldout.alignment_seed-null"
    assert training_detector[f"{prefix}/muons_pt5_10"] == own["heldout/muons_pt5_10"]  # the same muons
    assert training_detector[f"{prefix}/loss"] != own["heldout/loss"]  # seen by another detector

"""`python -m muonreg.display` draws a 1-muon and a 2-muon event of a real smoke run to a PNG, and
every run's evaluation logs displays of its best, a typical and its worst event."""

from __future__ import annotations

import subprocess
import sys

import pytest

from muonreg.data.format import DatasetReader
from muonreg.trained import read_checkpoint
from muonreg.training.setup import dataset_path, run_splits

from train_cli import ENV, ROOT, client

pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


def test_display_draws_one_and_two_muon_events_and_logs_to_the_run(smoke_run, tmp_path):
    root, best, run_id = smoke_run.root, smoke_run.best, smoke_run.run_id
    _, cfg = read_checkpoint(best)
    reader = DatasetReader(dataset_path(cfg))
    test = run_splits(cfg, len(reader))["test"]
    muons = [len(reader.read(int(i)).tracks) for i in test]
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    for n, source in ((1, ["--checkpoint", str(best)]), (2, ["--run-id", run_id])):
        out = tmp_path / f"{n}-muon.png"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "muonreg.display",
                *source,
                "--event",
                str(muons.index(n)),
                "--out",
                str(out),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert out.read_bytes().startswith(PNG) and out.stat().st_size > 20_000
    assert [a.path for a in client(root).list_artifacts(run_id, "displays")] == ["displays/2-muon.png"]
    # and every run's evaluation draws its best, a typical and its worst event by pT residual
    drawn = [a.path.split("/")[-1] for a in client(root).list_artifacts(run_id, "evaluation/displays")]
    assert len(drawn) == 3 and drawn[0].startswith("best-") and any(d.startswith("worst-") for d in drawn)

    result = subprocess.run(
        [sys.executable, "-m", "muonreg.display", "--checkpoint", str(best), "--event", "100000"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1 and result.stderr.startswith("error: --event 100000: the test split")

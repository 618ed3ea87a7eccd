"""ONNX export: the portable float64 math equals torch's, and the exported smoke-trained tracker,
run by ONNX Runtime, matches torch on real events (a batch, a 1-hit event, the largest event)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from muonreg import export
from muonreg.tasks import portable
from muonreg.trained import load_model
from muonreg.training.setup import dataset_path

from train_cli import ENV, ROOT, client


def _spread(n: int = 20000) -> torch.Tensor:
    """float64 values from 1e-12 to 1e6 in magnitude, both signs, and the special points."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-12, 1e-6, 1e-3, 0.1, 0.66, 1.0, 2.414, 3.0, 100.0, 1e6], dtype=torch.float64)
    x = torch.randn(len(scales), n, generator=g, dtype=torch.float64) * scales[:, None]
    return torch.cat(
        [x.flatten(), torch.tensor([0.0, 0.66, 2.414213562373095, -1e300, 1e300], dtype=torch.float64)]
    )


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / (torch.finfo(torch.float64).eps * b.abs().clamp(min=1e-300))).max())


def test_portable_math_agrees_with_torch_to_a_few_units_in_the_last_place():
    x = _spread()
    assert _ulps(portable.portable_atan(x), torch.atan(x)) <= 4
    finite = x[x.abs() < 1e100]
    assert _ulps(portable.portable_asinh(finite), torch.asinh(finite)) <= 4
    angle = x[x.abs() < 1.5]
    assert _ulps(portable.portable_tan(angle), torch.tan(angle)) <= 4
    moderate = x[x.abs() < 700]
    assert _ulps(portable.portable_cosh(moderate), torch.cosh(moderate)) <= 4
    y = torch.randn(len(x), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert float((portable.portable_atan2(y, x) - torch.atan2(y, x)).abs().max()) <= 1e-15
    axes = torch.tensor(
        [[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, -1.0], [1.0, -1.0], [-1.0, -1.0]]
    ).double()
    torch.testing.assert_close(portable.portable_atan2(*axes.T), torch.atan2(*axes.T), rtol=0, atol=1e-15)


def test_closed_form_solve_matches_lu_on_badly_scaled_normal_matrices():
    """The fit's normal matrices: weights 1/sigma^2 ~ 1e8 beside a prior of 1e-2."""
    g = torch.Generator().manual_seed(0)
    basis = (
        torch.randn(500, 40, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.05]).double()
    )
    weight = torch.rand(500, 40, generator=g, dtype=torch.float64) * 1e8
    normal = torch.einsum("bm,bmi,bmj->bij", weight, basis, basis) + torch.diag(
        torch.tensor([1e-2, 1e-2, 1.0])
    )
    rhs = torch.randn(500, 3, generator=g, dtype=torch.float64) * 1e6
    exact = torch.linalg.solve(normal, rhs)
    closed = (portable.inverse3(normal) @ rhs.unsqueeze(-1)).squeeze(-1)
    assert float(((closed - exact).abs() / exact.abs().amax(-1, keepdim=True)).max()) < 1e-10
    inverse = torch.linalg.inv(normal)
    assert (
        float(
            ((portable.inverse3(normal) - inverse).abs() / inverse.abs().amax((-1, -2), keepdim=True)).max()
        )
        < 1e-10
    )


def test_an_unwritable_destination_fails_before_any_work(tmp_path):
    never_read = tmp_path / "best.pt"  # not even there: the destination is checked first
    out = "/sys/model.onnx"  # a directory nobody may write in, root included
    with pytest.raises(SystemExit, match=r"^error: /sys/model\.onnx: cannot write the ONNX model there \("):
        export.main(["--checkpoint", str(never_read), "--out", out])
    assert not Path(out).exists()


@pytest.mark.slow
def test_exported_tracker_matches_torch_and_is_logged_to_the_run(smoke_run, tmp_path):
    root, best, run_id = smoke_run.root, smoke_run.best, smoke_run.run_id
    out = tmp_path / "model.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "muonreg.export", "--run-id", run_id, "--out", str(out)],
        cwd=ROOT,
        env={**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max |onnx - torch| valid_logit" in result.stdout and " 0 of " in result.stdout, result.stdout
    logged = {a.path for a in client(root).list_artifacts(run_id, "onnx")}
    assert logged == {"onnx/model.onnx", "onnx/check.json"}

    # independently of the tool's own check: ONNX Runtime against torch on the same real events
    model, cfg = load_model(best)
    batches = export.check_batches(cfg, dataset_path(cfg))
    assert [len(b["hit_valid"][0]) for _, b in batches[1:]] == [
        1,
        max(len(b["hit_valid"][0]) for _, b in batches),
    ]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(export.INPUTS)
    names = export.output_names(model)  # the default has the track fit: its uncertainties too
    assert [o.name for o in session.get_outputs()] == list(names) == [*export.OUTPUTS, *export.SIGMA_OUTPUTS]
    for what, batch in batches:
        with torch.no_grad():
            ref = [t.numpy() for t in export.OnnxTracker(model)(*(batch[k] for k in export.INPUTS))]
        got = session.run(list(names), {k: batch[k].numpy() for k in export.INPUTS})
        assert all(np.isfinite(g).all() and g.shape == r.shape for g, r in zip(got, ref, strict=True)), what
        if what == "an event cut to 1 hit":
            continue  # one drift circle has no side: float32 rounding may pick either (export.compare)
        valid_hits = batch["hit_valid"].numpy()[:, None, :]
        np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=export.LOGIT_ATOL)
        np.testing.assert_allclose(
            np.where(valid_hits, got[1], 0), np.where(valid_hits, ref[1], 0), rtol=0, atol=export.LOGIT_ATOL
        )
        np.testing.assert_allclose(got[2], ref[2], rtol=0, atol=1e-4)  # eta
        np.testing.assert_allclose(got[3], ref[3], rtol=0, atol=1e-4)  # phi
        np.testing.assert_allclose(1 / got[4], 1 / ref[4], rtol=1e-4, atol=1e-6)  # 1/pT
        np.testing.assert_array_equal(got[5], ref[5])  # q
        for i in range(6, 9):  # sigma(q/pT), sigma(eta), sigma(phi)
            assert (ref[i] > 0).all()
            np.testing.assert_allclose(got[i], ref[i], rtol=1e-4, atol=0, err_msg=names[i])

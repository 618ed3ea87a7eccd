"""Calibrating the per-track uncertainties (tasks.uncertainty) on the validation split after training.

The network's predictions do not change: only the correction's coefficients, a log-scale factor
on the fit's expected errors per field, linear in hat functions of the predicted log pT and |eta|.
Two steps on the reconstructed validation muons, for q/pT, eta and phi each:

1. the shape: the coefficients that maximise a Student-t likelihood (STUDENT_DOF degrees of
   freedom) of the residuals, a Gaussian one that a few tracks in the tails (a flipped charge, a
   wrongly assigned hit) cannot drag, with a weak pull towards no correction (PRIOR_MUONS);
2. the scale: in each bin of true pT (tasks.uncertainty.PT_EDGES), the pT hat's coefficient is
   moved by the log of the bin's pull width (68 % core, as it is evaluated), a few times over
   since neighbouring hats overlap, so the validation pull widths come out 1 per bin. In bins of
   the predicted pT they would not: a muon lands in the highest predicted bin because its pT came
   out high, so that bin holds the large residuals of lower-pT muons (on the default network, 0.78
   instead of 0.87 at 100-200 GeV on the test split).

A bin with fewer than MIN_BIN_MUONS muons keeps the first step's scale; fewer than MIN_MUONS in
all skip the first step. The fit starts from the fit's own errors whatever the coefficients were:
calibrating twice gives the same model.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize
from torch import nn
from torch.utils.data import DataLoader

from muonreg.evaluation.inference import evaluate, unwrap
from muonreg.evaluation.metrics import core_width
from muonreg.evaluation.pulls import residuals_and_sigmas
from muonreg.tasks.uncertainty import PT_EDGES, UNCERTAIN

STUDENT_DOF = 4.0
PRIOR_MUONS = 10.0  # the pull towards no correction weighs as much as this many muons' likelihood
MIN_MUONS = 100
MIN_BIN_MUONS = 30
SCALE_ITERATIONS = 4


def _student_t_shape(features: np.ndarray, log_sigma: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Coefficients c [features] minimising sum over muons of the Student-t negative log-likelihood
    of residual given the scale exp(log_sigma + features @ c), plus PRIOR_MUONS / 2 |c|^2."""
    nu = STUDENT_DOF
    a = residual**2 / nu

    def objective(c: np.ndarray) -> tuple[float, np.ndarray]:
        s = log_sigma + features @ c
        u = a * np.exp(-2 * s)
        value = np.sum(s + (nu + 1) / 2 * np.log1p(u)) + PRIOR_MUONS / 2 * c @ c
        ds = 1 - (nu + 1) * u / (1 + u)
        return float(value), features.T @ ds + PRIOR_MUONS * c

    return minimize(objective, np.zeros(features.shape[1]), jac=True, method="L-BFGS-B").x


def fit_correction(
    residual: np.ndarray, sigma: np.ndarray, features: np.ndarray, true_pt: np.ndarray
) -> np.ndarray:
    """The coefficients [fields, features] that calibrate `sigma` [muons, fields] (the fit's own
    errors) against `residual` [muons, fields]; `features` [muons, features] (pT hats first, of the
    predicted pT), `true_pt` [muons] for the bins of step 2."""
    delta = np.zeros((residual.shape[1], features.shape[1]))
    log_sigma = np.log(sigma)
    if len(residual) >= MIN_MUONS:
        for k in range(residual.shape[1]):
            delta[k] = _student_t_shape(features, log_sigma[:, k], residual[:, k])
    pt_bin = np.digitize(true_pt, PT_EDGES[1:-1])  # open-ended: the end hats are flat beyond their knots
    for _ in range(SCALE_ITERATIONS):
        pulls = residual / np.exp(log_sigma + features @ delta.T)
        for j in range(len(PT_EDGES) - 1):
            selected = pulls[pt_bin == j]
            if len(selected) >= MIN_BIN_MUONS:
                delta[:, j] += np.log([core_width(column) for column in selected.T])
    return delta


@torch.no_grad()
def calibrate_uncertainty(
    model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None
) -> dict[str, float]:
    """Fit the model's uncertainty correction on `loader`'s split (validation), in place; return
    the split's pull widths with the fit's own errors (`calibration/<field>_pull_width_fit`) and
    calibrated (`calibration/<field>_pull_width`); empty without an uncertainty or muons."""
    uncertainty = unwrap(model).regression_task.uncertainty
    if uncertainty is None:
        return {}
    _, records = evaluate(model, loader, device, amp_dtype, prefix="calibration")
    rows = records.arrays()
    if not rows or not rows["reco"].any():
        return {}
    residual, sigma = residuals_and_sigmas(rows)
    reco = rows["reco"].astype(bool)
    pt, eta = (torch.from_numpy(rows[f"pred_{f}"][reco]) for f in ("pt", "eta"))
    coefficients = uncertainty.coefficients
    features = uncertainty.features(pt.to(coefficients), eta.to(coefficients)).double().cpu().numpy()
    # back to the fit's own errors: the result does not depend on an earlier calibration
    base = sigma / np.exp(features @ coefficients.double().cpu().numpy().T)
    fitted = fit_correction(residual, base, features, rows["true_pt"][reco])
    coefficients.copy_(torch.from_numpy(fitted))
    calibrated = base * np.exp(features @ fitted.T)
    widths = {
        name: [core_width(residual[:, k] / errors[:, k]) for k in range(len(UNCERTAIN))]
        for name, errors in (("_fit", base), ("", calibrated))
    }
    return {
        "calibration/muons": float(len(residual)),
        **{
            f"calibration/{f}_pull_width{name}": w[k]
            for name, w in widths.items()
            for k, f in enumerate(UNCERTAIN)
        },
    }

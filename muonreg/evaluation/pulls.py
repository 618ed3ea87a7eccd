"""Pulls of the per-track uncertainties: (predicted - true) / sigma for q/pT, eta and phi.

The width of a pull distribution is the half-width of its central 68 % interval (`core_width`,
the same measure as the resolutions): 1 for errors that are Gaussian with the sigma the network
states, and blind to the few tracks in the tails (a charge flipped at 200 GeV, a wrongly
assigned hit) that would dominate an RMS. Uncertainties are calibrated when the pull width is 1
in every pT bin (the target: 0.9-1.1). Its statistical error, PULL_WIDTH_ERROR * width / sqrt(n),
is the large-sample error of a 68 % half-width of Gaussian values (the two quantiles' variances
and covariance), 36 % more than the width / sqrt(2 n) of an RMS. Only reconstructed muons count,
as for the resolutions; rows without sigmas (a network without a track fit, the least-squares
fit) have no pulls.
"""

from __future__ import annotations

import numpy as np

from muonreg.evaluation.metrics import core_width, wrap_angle
from muonreg.tasks.uncertainty import UNCERTAIN

PULL_WIDTH_ERROR = 0.962  # sqrt(p(1 - p) - p^2) / (sqrt(2) gauss(1)) for p = 0.1587, the 68 % interval's tail


def has_pulls(rows: dict[str, np.ndarray]) -> bool:
    return all(f"sigma_{f}" in rows for f in UNCERTAIN)


def residuals_and_sigmas(rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(predicted - true, sigma), each [reconstructed muons, UNCERTAIN]; phi the short way round."""
    r = {k: v[rows["reco"].astype(bool)] for k, v in rows.items()}
    q_pred = np.where(r["pred_q"] >= 0, 1.0, -1.0)
    residual = {
        "qpt": q_pred / r["pred_pt"] - r["true_q"] / r["true_pt"],
        "eta": r["pred_eta"] - r["true_eta"],
        "phi": wrap_angle(r["pred_phi"] - r["true_phi"]),
    }
    stack = lambda columns: np.stack([columns[f] for f in UNCERTAIN], -1).astype(np.float64)  # noqa: E731
    return stack(residual), stack({f: r[f"sigma_{f}"] for f in UNCERTAIN})


def pulls(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """field -> pulls of the reconstructed muons."""
    residual, sigma = residuals_and_sigmas(rows)
    return dict(zip(UNCERTAIN, (residual / sigma).T, strict=True))


def pull_metrics(rows: dict[str, np.ndarray]) -> dict[str, float]:
    """<field>_pull_width (68 % core), its error and <field>_pull_median of a set of rows."""
    out = {}
    for field, x in pulls(rows).items():
        width = core_width(x)
        out[f"{field}_pull_width"] = width
        out[f"{field}_pull_width_err"] = PULL_WIDTH_ERROR * width / np.sqrt(len(x)) if len(x) else np.nan
        out[f"{field}_pull_median"] = float(np.median(x)) if len(x) else np.nan
    out["pull_muons"] = float(rows["reco"].sum())
    return out

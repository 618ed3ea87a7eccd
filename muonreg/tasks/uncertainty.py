"""Per-track uncertainties of q/pT, eta and phi: the in-network fit's expected errors, corrected.

The base of each sigma is what the track fit expects of its own estimates (`fit_errors`: the
fit's covariance, the calorimeter's scattering and energy-loss spread, the sector's width for a
phi without strips): it knows which tracks are precise, but not how much better or worse the
network does than the fit it corrects. That is the learned correction, a log-scale factor per field, linear in a few
features of the predicted track:

    log sigma = log base + sum_j c_j phi_j(pT, |eta|)

phi_j are piecewise-linear "hat" functions of log pT with their knots at the centres of the pT
bins PT_EDGES (they sum to 1: a free scale per pT region, interpolated between them) and of |eta|
at the centres of ETA_EDGES (all but the first: the barrel is the reference). The coefficients c
are buffers, not parameters: training never touches them, so they change none of the network's
predictions; `muonreg.evaluation.calibration` fits them on the validation split after training,
and they travel in the checkpoint. Zero (a checkpoint from before them, or before calibration)
leaves the fit's own errors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from muonreg import detector as det
from muonreg.numerics import safe_log, sigma_from_log
from muonreg.tasks import portable

UNCERTAIN = ("qpt", "eta", "phi")  # the fields with a sigma: prediction keys track_sigma_<field>
# phi of a track without strips (beyond the trigger chambers' |eta| < 2.4) is its sector's centre
SECTOR_PHI_SIGMA = det.SECTOR_WIDTH / math.sqrt(12)
STRIP_WEIGHT = 3.0  # a track's strips (summed assignment weights) against the sector's phi: exp(-3 n)
PT_EDGES = (5.0, 10.0, 20.0, 50.0, 100.0, 200.0)  # GeV: the evaluation's default pT bins
ETA_EDGES = (0.0, 1.05, 2.0, 2.7)  # |eta|: barrel, transition, endcap (the default eta bins)


def _centres(edges: Sequence[float], log: bool) -> torch.Tensor:
    pairs = itertools.pairwise(edges)
    return torch.tensor([math.log(math.sqrt(lo * hi)) if log else (lo + hi) / 2 for lo, hi in pairs])


@torch.no_grad()
def fit_errors(fit: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base of the sigmas [..., len(UNCERTAIN)] from the fit's outputs: q/pT as the anchor
    expects it (`expected`: weighted_pooling's `expected_errors`); eta from the fit's slope
    covariance and the calorimeter's scattering (the anchor's nominal 2 mrad is too coarse for a
    high-pT track's direction); phi the anchor's, widened towards the sector's width / sqrt(12)
    for a track without strips (`phi_strips`), whose phi only its tubes' sector gives."""
    cosh, slope = portable.cosh(fit["eta"]), fit["slope"]
    direction = fit["slope_sigma"] / (1 + slope**2)  # d(lambda) = d(slope) / (1 + slope^2)
    eta = cosh * torch.sqrt(direction**2 + (det.CALO_SCATTERING / fit["p"]) ** 2)
    no_strips = torch.exp(-STRIP_WEIGHT * fit["phi_strips"])
    phi = torch.sqrt(expected["truthMuon_phi"] ** 2 + no_strips * SECTOR_PHI_SIGMA**2)
    return torch.stack([expected["truthMuon_qpt"], eta, phi], -1)


def hat_basis(x: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation weights of x [...] at `knots` (increasing) -> [..., knots]:
    1 at its own knot, falling linearly to 0 at the neighbours, constant beyond the end knots; the
    weights of any x sum to 1."""
    x = torch.minimum(torch.maximum(x, knots[0]), knots[-1]).unsqueeze(-1)
    left = torch.cat([knots[:1] - 1, knots[:-1]])  # the end knots' outer slopes are never reached
    right = torch.cat([knots[1:], knots[-1:] + 1])
    rising, falling = (x - left) / (knots - left), (right - x) / (right - knots)
    return torch.minimum(rising, falling).clamp(0.0, 1.0)


class TrackUncertainty(nn.Module):
    """sigma [..., len(UNCERTAIN)] from the fit's expected errors and the predicted pT and eta."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pt_knots", _centres(PT_EDGES, log=True), persistent=False)
        self.register_buffer("eta_knots", _centres(ETA_EDGES, log=False), persistent=False)
        features = len(self.pt_knots) + len(self.eta_knots) - 1
        self.register_buffer("coefficients", torch.zeros(len(UNCERTAIN), features))

    def features(self, pt: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        """[..., features]: the pT hats, then the |eta| hats but the first."""
        log_pt = torch.log(pt.clamp(min=PT_EDGES[0]))  # below the first knot the hats are constant
        eta_hats = hat_basis(eta.abs(), self.eta_knots)[..., 1:]
        return torch.cat([hat_basis(log_pt, self.pt_knots), eta_hats], -1)

    def forward(self, base: torch.Tensor, pt: torch.Tensor, eta: torch.Tensor) -> dict[str, torch.Tensor]:
        """`base` [..., 3]: the fit's expected errors of UNCERTAIN; pt, eta [...]: the predicted track.
        Returns track_sigma_<field> [...], finite and > 0 whatever the inputs."""
        correction = self.features(pt, eta) @ self.coefficients.T
        sigma = sigma_from_log(safe_log(base) + correction)
        return {f"track_sigma_{f}": sigma[..., i] for i, f in enumerate(UNCERTAIN)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint from before the correction existed loads with none (the fit's own errors)."""
        state_dict.setdefault(prefix + "coefficients", torch.zeros_like(self.coefficients))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

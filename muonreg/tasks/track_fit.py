"""A differentiable track fit of each query's hits: the network sees the bending, as a fit does.

A sagitta is a millimetre difference between stations metres apart; pooled hit features cannot
form it, a least-squares fit can. For every query, over the hits its assignment selects (weights
= assignment probability), in float64 and outside any autocast:

1. the track plane: phi from the strips (tubes only know their sector), side from z;
2. every hit in that plane, relative to the straight line from the vertex through the hits'
   weighted centre at angle lambda0: along it t, across it u;
3. a linearised track model u(t) = a + b t + c D(t), where D is the nominal field's deflection of a
   unit q/p along that line (`detector.deflection_table`) and c = q/p (folded to z > 0);
4. weighted least squares for (a, b, c), solved per track (3x3, batched): first wires and strips as
   points, then MDT drift circles with their side chosen softly and then firmly (deterministic
   annealing: the target is wire + r tanh(r d / s^2) for a track at distance d from the wire, with
   the variance the undecided side adds, s shrinking from 3 mm to 0), each iteration
   down-weighting hits by their residual (Cauchy weights: a wrongly assigned hit is centimetres
   away, a true one a fraction of a millimetre), with the track model's own error (scattering,
   the small-angle approximation) growing with |c|.

Returns per-track features (q/p and its error, direction, position, chi2, hits used, the weight
of the strips that gave phi) and physics
estimates at the vertex: eta of the direction at the calorimeter, q/pT with the calibrated
calorimeter energy loss added back, phi with the solenoid's turn undone (the classical estimate
the head refines).
Finite values and gradients for 0, 1 or 2 selected hits (weak priors on a, b, c keep the system
regular). Batched: no Python loop over tracks or hits.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from muonreg import detector as det
from muonreg.data.geometry import G
from muonreg.numerics import MEASUREMENT_SIGMA_FLOOR, safe_inverse, safe_unit, weighted_average
from muonreg.reco.energy_loss import TABLE as ENERGY_LOSS_TABLE
from muonreg.tasks import portable

WIRE_SIGMA = det.TUBE_RADIUS / math.sqrt(3) * 1e-3  # m: a tube as its wire, the track anywhere inside
MDT_PHI_WEIGHT = 1e-3  # tubes only give the sector's direction: they count for phi only without strips
PHI_WINDOW = 0.05  # rad: strips further from the track's phi count less for it
PRIOR_SIGMA = (10.0, 10.0, 1.0)  # (a [m], b, c [1/GeV]): wide, only keeps a fit of < 3 hits regular
OUT_OF_SECTOR = math.cos(det.SECTOR_WIDTH)  # a hit further from the track plane than this is not its hit
STEEPEST = 1.5  # rad from the transverse plane (|eta| 3.3, beyond the spectrometer's 2.7): tan stays finite


def _interpolate(table: torch.Tensor, x: torch.Tensor, y: torch.Tensor, x_range, y_range) -> torch.Tensor:
    """Bilinear interpolation of a regular grid `table` [X, Y] at points (x, y), clamped to the grid."""
    nx, ny = table.shape
    fx = ((x - x_range[0]) / (x_range[1] - x_range[0]) * (nx - 1)).clamp(0, nx - 1)
    fy = ((y - y_range[0]) / (y_range[1] - y_range[0]) * (ny - 1)).clamp(0, ny - 1)
    x0, y0 = fx.floor().clamp(max=nx - 2).long(), fy.floor().clamp(max=ny - 2).long()
    dx, dy = fx - x0, fy - y0
    corner = lambda i, j: table[x0 + i, y0 + j]  # noqa: E731
    return (
        corner(0, 0) * (1 - dx) * (1 - dy)
        + corner(1, 0) * dx * (1 - dy)
        + corner(0, 1) * (1 - dx) * dy
        + corner(1, 1) * dx * dy
    )


class TrackFit(nn.Module):
    """Linearised, robust least-squares fit of weighted hits, batched over events and queries."""

    def __init__(
        self,
        wire_iterations: int = 2,
        side_scales: tuple[float, ...] = (3e-3, 1e-3, 3e-4, 1e-4, 0.0),
        robust_scale: float = 3.0,
        model_error: float = 0.02,
        deflection: tuple | None = None,
    ):
        """`deflection`: (lambda grid, t grid, table) to use instead of the detector's field
        (`detector.deflection_table`), e.g. a uniform field, where tracks are parabolas."""
        super().__init__()
        self.wire_iterations, self.side_scales = wire_iterations, tuple(side_scales)
        self.robust_scale, self.model_error = robust_scale, model_error
        lam, t, deflection = deflection or det.deflection_table()[:3]
        self.lam_range, self.t_range = (float(lam[0]), float(lam[-1])), (float(t[0]), float(t[-1]))
        self.register_buffer("deflection", torch.tensor(deflection, dtype=torch.float64), persistent=False)
        loss = json.loads(ENERGY_LOSS_TABLE.read_text())
        eta, log_p = loss["abs_eta_centres"], loss["log_p_centres"]
        self.eta_range, self.log_p_range = (eta[0], eta[-1]), (log_p[0], log_p[-1])
        self.register_buffer(
            "energy_loss", torch.tensor(loss["median_loss"], dtype=torch.float64), persistent=False
        )
        self.register_buffer(
            "prior", torch.tensor([s**-2 for s in PRIOR_SIGMA], dtype=torch.float64), persistent=False
        )

    def forward(self, geometry: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """geometry [b, m, len(GEOMETRY)] (data.geometry), weights [b, n, m] >= 0 -> features [b, n]."""
        with torch.autocast(geometry.device.type, enabled=False):
            return self._fit(geometry.double(), weights.double())

    def _fit(self, g: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
        col = {name: g[..., i].unsqueeze(1) for name, i in G.items()}  # [b, 1, m]
        mdt, barrel = col["mdt"], col["barrel"]
        with torch.no_grad():  # the plane is chosen from the hits, not differentiated
            # 1. the track plane: phi from the strips (a second pass down-weights strips away from it)
            phi_weight = w * torch.where(mdt > 0, MDT_PHI_WEIGHT, 1.0)
            for _ in range(2):
                cos_phi, sin_phi = safe_unit(
                    weighted_average(phi_weight, col["cos_phi"]), weighted_average(phi_weight, col["sin_phi"])
                )
                across = col["sin_phi"] * cos_phi - col["cos_phi"] * sin_phi
                along = col["cos_phi"] * cos_phi + col["sin_phi"] * sin_phi
                near = torch.exp(-0.5 * (portable.atan2(across, along) / PHI_WINDOW) ** 2)
                phi_weight = phi_weight * torch.where(mdt > 0, 1.0, near)
            phi_strips = (phi_weight * (mdt <= 0)).sum(-1)  # no strips (|eta| > 2.4): phi is the sector's
            side = torch.where(weighted_average(w, col["z"]) >= 0, 1.0, -1.0).to(w)
            # 2. hits in the track plane (folded to z > 0); hits of other sectors are not this track's
            cos_dphi = col["cos_phi_s"] * cos_phi + col["sin_phi_s"] * sin_phi
            in_sector = cos_dphi > OUT_OF_SECTOR
            rho = col["normal"] / cos_dphi.clamp(min=OUT_OF_SECTOR)
            z = col["z"] * side
            lam0 = portable.atan2(weighted_average(w, z), weighted_average(w, rho)).clamp(0.0, math.pi / 2)
            cos0, sin0 = torch.cos(lam0), torch.sin(lam0)
            t = rho * cos0 + z * sin0
            u = -rho * sin0 + z * cos0
            deflection = _interpolate(self.deflection, lam0.expand_as(t), t, self.lam_range, self.t_range)
        w = w * in_sector
        # precision of each measurement across the line: drift circles across the track already,
        # z of a barrel strip tilts by cos(lambda0), the radius of an endcap strip by sin(lambda0)
        strip_sigma = col["sigma"] * torch.where(barrel > 0, cos0, sin0).abs()
        sigma = torch.where(mdt > 0, col["sigma"], strip_sigma).clamp(min=MEASUREMENT_SIGMA_FLOOR)
        # 3-4. iterated weighted least squares; the basis is centred for conditioning
        t_mean, d_mean = weighted_average(w, t), weighted_average(w, deflection)
        basis = torch.stack([torch.ones_like(t), t - t_mean, deflection - d_mean], -1)  # [b, n, m, 3]
        robust = torch.ones_like(w)
        params = torch.zeros(*w.shape[:2], 3, dtype=g.dtype, device=g.device)
        schedule = [None] * self.wire_iterations + list(self.side_scales)
        differentiated = torch.is_grad_enabled()
        for step, side_scale in enumerate(schedule):
            with torch.no_grad():  # sides and robustness weights are chosen, not differentiated
                model = (basis * params.unsqueeze(2)).sum(-1)
                if side_scale is None:  # wires as points spread over the tube
                    target, measured = u, torch.where(mdt > 0, WIRE_SIGMA, sigma).square()
                else:  # the drift circle's side, softly at first (annealed), as the track gets precise
                    drift = col["drift"] * mdt
                    if side_scale > 0:
                        side_of_track = torch.tanh(drift * (model - u) / side_scale**2)
                    else:
                        side_of_track = torch.where(model >= u, 1.0, -1.0)
                    target = u + side_of_track * drift
                    measured = sigma.square() + drift.square() * (1 - side_of_track.square())
                spread = (self.model_error * params[..., 2:3] * (deflection - d_mean)).square()
                total_sigma = (measured + spread).sqrt()
                if step:
                    robust = 1 / (1 + ((target - model) / (self.robust_scale * total_sigma)).square())
            # only the last solve reaches the outputs: the earlier ones build no autograd graph
            with torch.set_grad_enabled(differentiated and step == len(schedule) - 1):
                weight = w * robust / total_sigma.square()
                weighted = (basis * weight.unsqueeze(-1)).mT  # [b, n, 3, m]
                normal = weighted @ basis + torch.diag(self.prior)
                rhs = (weighted @ target.unsqueeze(-1)).squeeze(-1)
                params = portable.solve(normal, rhs)
        line = params[..., 0:1] + params[..., 1:2] * (t - t_mean)  # the track without its bending
        residual = (target - (basis * params.unsqueeze(2)).sum(-1)) / total_sigma
        used = (w * robust).sum(-1)
        chi2 = (w * robust * residual.square()).sum(-1)
        covariance = portable.inverse(normal)
        a, b, c = params.unbind(-1)
        side, lam0, cos_phi, sin_phi, t_mean, d_mean = (
            x.squeeze(-1) for x in (side, lam0, cos_phi, sin_phi, t_mean, d_mean)
        )
        qp = c * side
        # direction where the track leaves the calorimeter: the field is still zero there
        lam_exit = lam0 + portable.atan(b)
        eta = portable.asinh(portable.tan(lam_exit.clamp(-STEEPEST, STEEPEST))) * side
        p_ms = safe_inverse(qp.abs())
        loss = _interpolate(self.energy_loss, eta.abs(), torch.log(p_ms), self.eta_range, self.log_p_range)
        qpt = torch.where(qp >= 0, 1.0, -1.0).to(qp) * portable.cosh(eta) * safe_inverse(p_ms + loss)
        return {
            "phi": portable.atan2(sin_phi, cos_phi) + det.SOLENOID_PHI_KICK * qpt,
            "qp": qp,
            "qp_sigma": covariance[..., 2, 2].sqrt(),
            "eta": eta,
            "cos_phi": cos_phi,
            "sin_phi": sin_phi,
            "position": a - b * t_mean - c * d_mean,
            "slope": b,
            "slope_sigma": covariance[..., 1, 1].sqrt(),
            "p": p_ms + loss,
            "chi2_ndf": chi2 * safe_inverse((used - 3).clamp(min=1)),
            "hits": used,
            "phi_strips": phi_strips,
            "qpt": qpt,
            # each hit in each track's frame, on scales of order one: along the line (5 m), across it
            # (asinh of cm: millimetres to metres), and its pull to the fitted track (asinh)
            "local": torch.stack(
                [(t - t_mean.unsqueeze(-1)) / 5, portable.asinh((u - line) / 0.01), portable.asinh(residual)],
                -1,
            ),
        }

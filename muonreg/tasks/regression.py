"""Track-parameter regression: target spaces (inverse fields, normalisation) and the query-only baseline.

The network works in an internal space: fields listed in `inverse_fields` are regressed as 1/x
(curvature-like 1/pT by default), then every field is standardised with a mean and standard
deviation fitted on training targets. The loss lives in that space; `predict` returns the
original physical space (GeV for pT), so the choice is invisible to the user and the metrics.
With the signed-curvature target `truthMuon_qpt`, `predict` also returns pT = 1/|q/pT| and the
charge as the sign. pT is positive whatever the network outputs (a negative raw 1/pT decodes by
its magnitude). phi is an angle: its loss is taken on the difference wrapped into [-pi, pi), so a
prediction of +3.1 for a truth of -3.1 is 0.08 rad off, not 6.2, and predictions are wrapped.
Each field's loss can be weighted (`loss_weights`). A task with a track fit also predicts each
track's uncertainties sigma(q/pT), sigma(eta), sigma(phi) (`tasks.uncertainty`), which no loss trains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from muonreg.data.schema import QPT
from muonreg.models.layers import mlp
from muonreg.numerics import masked_mean, safe_inverse
from muonreg.tasks.uncertainty import TrackUncertainty

ANGLES = ("truthMuon_phi",)  # periodic fields: losses on wrapped differences
POSITIVE = ("truthMuon_pt",)  # magnitudes: decoded as such


def wrap(angle: torch.Tensor) -> torch.Tensor:
    """An angle folded into [-pi, pi)."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


class TargetSpace(nn.Module):
    """Maps physical targets to the network's standardised (and partly inverted) space and back."""

    def __init__(self, fields: Sequence[str], inverse_fields: Sequence[str] = ()):
        super().__init__()
        self.fields = list(fields)
        self.inverse_fields = [f for f in self.fields if f in inverse_fields]  # Python-side, for tracing
        unknown = [f for f in inverse_fields if f not in self.fields]
        if unknown:
            raise ValueError(
                f"inverse field(s) {unknown} are not regression targets; targets are {self.fields}"
            )
        # buffers, so they move with the module: no host-to-device copy per step
        self.register_buffer(
            "inverse", torch.tensor([f in inverse_fields for f in self.fields]), persistent=False
        )
        self.register_buffer("angle", torch.tensor([f in ANGLES for f in self.fields]), persistent=False)
        self.register_buffer("mean", torch.zeros(len(self.fields)))
        self.register_buffer("std", torch.ones(len(self.fields)))

    def _invert(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.inverse, safe_inverse(x), x)

    def physical(self, truth: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stack `particle_<field>` targets into [..., fields] (unnormalised, un-inverted)."""
        return torch.stack([truth[f"particle_{f}"] for f in self.fields], dim=-1)

    def encode(self, truth: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode_values(self.physical(truth))

    def encode_values(self, physical: torch.Tensor) -> torch.Tensor:
        """Physical values [..., fields] into the internal (inverted, standardised) space."""
        return (self._invert(physical) - self.mean) / self.std

    def error(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Prediction minus target in the internal space, angles the short way round the circle."""
        diff = raw - target
        return torch.where(self.angle, wrap(diff * self.std) / self.std, diff)

    def decode(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        values = self._invert(raw * self.std + self.mean)
        values = torch.where(self.angle, wrap(values), values)
        out = {f"track_{f}": values[..., i] for i, f in enumerate(self.fields)}
        for f in POSITIVE:
            if f"track_{f}" in out:
                out[f"track_{f}"] = out[f"track_{f}"].abs()
        if "truthMuon_q" in self.fields:
            out["track_truthMuon_q"] = torch.where(out["track_truthMuon_q"] < 0, -1.0, 1.0)
        if QPT in self.fields:
            qpt = out[f"track_{QPT}"]
            out["track_truthMuon_pt"] = safe_inverse(qpt.abs())
            out["track_truthMuon_q"] = torch.where(qpt < 0, -1.0, 1.0)
        return out

    @torch.no_grad()
    def fit(self, truth: dict[str, torch.Tensor], valid: torch.Tensor) -> None:
        """Set the standardisation from training targets of valid slots."""
        x = self._invert(self.physical(truth).to(self.mean))[valid.to(self.mean.device)]
        if len(x) == 0:
            return
        std = x.std(0, unbiased=False) if len(x) > 1 else torch.ones_like(self.std)
        self.mean.copy_(x.mean(0))
        self.std.copy_(torch.where(std > 0, std, torch.ones_like(std)))


class RegressionTask(nn.Module):
    """Shared loss/predict of the regression tasks; subclasses produce `track_regression` [b, n, fields]."""

    def __init__(
        self,
        fields: Sequence[str],
        inverse_fields: Sequence[str] = (),
        loss_weight: float = 1.0,
        field_weights: Mapping[str, float] | None = None,
    ):
        super().__init__()
        self.space = TargetSpace(fields, inverse_fields)
        self.loss_weight = loss_weight
        field_weights = dict(field_weights or {})
        unknown = sorted(set(field_weights) - set(self.space.fields))
        if unknown:
            raise ValueError(
                f"loss weights for {unknown}, which are not targets; targets are {self.space.fields}"
            )
        weights = [float(field_weights.get(f, 1.0)) for f in self.space.fields]
        if any(w < 0 for w in weights) or not any(weights):
            raise ValueError(f"field loss weights {weights} must be >= 0 and not all 0")
        self.register_buffer("field_weights", torch.tensor(weights), persistent=False)
        self.uncertainty: TrackUncertainty | None = None  # a task with a track fit sets it

    @property
    def fields(self) -> list[str]:
        return self.space.fields

    def fit_normalization(self, truth: dict[str, torch.Tensor], valid: torch.Tensor) -> None:
        self.space.fit(truth, valid)

    def loss(
        self, outputs: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Smooth L1 in the internal space over valid truth slots; 0 (not NaN) when there are none.

        With `track_regression_scale` (an anchored task's expected error per track and field) the
        error is measured in those units."""
        target = self.space.encode(truth)
        valid = truth["particle_valid"]
        # invalid slots carry 0 targets; keep them out of the graph entirely
        target = torch.where(valid.unsqueeze(-1), target, torch.zeros_like(target))
        error = self.space.error(outputs["track_regression"], target)
        if "track_regression_scale" in outputs:  # errors in units of each estimate's expected error
            error = error / outputs["track_regression_scale"]
        loss = F.smooth_l1_loss(error, torch.zeros_like(error), reduction="none") * self.field_weights
        return {"track_regression": masked_mean(loss, valid.unsqueeze(-1).expand_as(loss))}

    def predict(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Track parameters in physical units, and `track_sigma_<field>` where the task has a
        per-track uncertainty (`uncertainty`, from the fit's expected errors `track_fit_sigma`)."""
        values = self.space.decode(outputs["track_regression"])
        if self.uncertainty is None:
            return values
        pt, eta = values["track_truthMuon_pt"], values["track_truthMuon_eta"]
        return {**values, **self.uncertainty(outputs["track_fit_sigma"], pt, eta)}


class ObjectRegressionTask(RegressionTask):
    """Baseline: track parameters from the query embedding alone."""

    def __init__(
        self,
        dim: int,
        fields: Sequence[str],
        inverse_fields: Sequence[str] = (),
        loss_weight: float = 1.0,
        hidden: int | None = None,
        field_weights: Mapping[str, float] | None = None,
    ):
        super().__init__(fields, inverse_fields, loss_weight, field_weights)
        self.net = mlp(dim, hidden or 2 * dim, len(self.fields), layers=3)

    def forward(self, query: torch.Tensor, **_: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"track_regression": self.net(query)}

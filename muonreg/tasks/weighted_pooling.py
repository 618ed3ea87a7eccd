"""WeightedPoolingObjectHitRegressionTask (seeds/weighted-pooling-regression-task.md).

For each track: p = sigmoid(hit-mask logits); `hard` keeps the valid hits with p >= threshold
(a probability exactly at the threshold is kept) weighted by p, `soft` keeps every valid hit
weighted by p. What the head sees is the `pooling` configuration:
- `mean`, `sum`, `max`, `min`: raw hit inputs and encoded hits, each through a small net to dim/2
  features, pooled over the kept hits (the seed's task: whole-track pools, blind to a sagitta);
- `station`: the same two branches averaged per station (inner, middle, outer, EE, trigger
  strips), with each station's share of the weight, so the head sees where the track crosses each;
- `fit`: a weighted least-squares track fit of the kept hits (`track_fit.TrackFit`): q/p, its
  error, direction, position, chi2 and hits used, and the fit's estimates of the targets.
With `fit`, `anchor` makes the head predict a correction to the fit's estimate rather than the
value itself, in units of the estimate's expected error (the fit's covariance, the calorimeter's
scattering and energy-loss spread): where the fit is precise (high pT) the head can only nudge
it, where it is not (low pT: scattering, the linearisation) the head can move it far. A head's
jitter of 0.01 standard deviations of 1/pT is 20 % of pT at 150 GeV; scaled, it is a fraction
of the fit's own error. With `pull_loss` > 0 the curvature's loss (1/pT, pT or q/pT) is taken on
the error in those same units (a pull), weighted by `pull_loss`, so a 150 GeV muon, whose 1/pT
error is tiny in absolute terms, counts as much as a 5 GeV one (the angles keep their loss in
standard deviations of the targets: in pulls their corrections turned noisy).
With `fit`, the task also gives each track the fit's expected errors of q/pT, eta and phi
(`track_fit_sigma`), which `tasks.uncertainty` corrects into the per-track uncertainties.
`local` feeds the raw branch each hit's
coordinates relative to its track's fitted line (along it, across it, and across it in units of
the measurement's resolution), so pooled features are in the track's frame, not the detector's.
The pooled parts are concatenated with the query embedding into an MLP head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from muonreg import detector as det
from muonreg.data.geometry import STATION_GROUPS, G
from muonreg.models.layers import full_precision, mlp
from muonreg.numerics import WEIGHT_FLOOR, safe_inverse
from muonreg.tasks import portable
from muonreg.tasks.pooling import POOLING
from muonreg.tasks.regression import RegressionTask
from muonreg.tasks.track_fit import TrackFit
from muonreg.tasks.uncertainty import TrackUncertainty, fit_errors

ASSIGNMENTS = ("hard", "soft")
CURVATURE = ("truthMuon_pt", "truthMuon_qpt")
OPS = (*POOLING, "station", "fit")
# The fit's estimate of each target, in physical units, from its outputs.
ANCHORS = {
    "truthMuon_eta": lambda fit: fit["eta"],
    "truthMuon_phi": lambda fit: fit["phi"],
    "truthMuon_pt": lambda fit: safe_inverse(fit["qpt"].abs()),
    "truthMuon_q": lambda fit: torch.where(fit["qpt"] >= 0, 1.0, -1.0).to(fit["qpt"]),
    "truthMuon_qpt": lambda fit: fit["qpt"],
}
# An anchor further than this from the targets' mean (in their standard deviations) is no estimate
# (a fit of nothing has q/p = 0: pT = 1e6 GeV); it is held at this distance.
ANCHOR_LIMIT = 10.0
ANGLE_MEASUREMENT = 0.002  # rad: the spectrometer's typical precision on a direction (strips for phi)
# The scale of the head's corrections (internal units) stays within these: never frozen, never wild.
SCALE_RANGE = (1e-3, 1.0)
FIT_FEATURES = 10  # see _fit_features
LOCAL_FEATURES = 3  # see TrackFit: along the line, across it, residual in resolutions


class WeightedPoolingObjectHitRegressionTask(RegressionTask):
    """Track parameters from the query and the raw and encoded hits its hit-mask logits assign to it."""

    def __init__(
        self,
        dim: int,
        input_size: int,
        fields: Sequence[str],
        inverse_fields: Sequence[str] = ("truthMuon_pt",),
        hit_fields_index: Sequence[int] | None = None,
        assignment_threshold: float = 0.1,
        assignment: str = "hard",
        pooling: Sequence[str] = ("mean", "sum", "max", "min"),
        loss_weight: float = 1.0,
        detach_assignment: bool = False,
        hidden: int | None = None,
        field_weights: Mapping[str, float] | None = None,
        anchor: bool = True,
        pull_loss: float = 0.0,
        local: bool = False,
        fit: TrackFit | None = None,
    ):
        super().__init__(fields, inverse_fields, loss_weight, field_weights)
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment={assignment!r} must be one of {list(ASSIGNMENTS)}")
        unknown = [op for op in pooling if op not in OPS]
        if unknown or not pooling:
            raise ValueError(f"pooling ops {list(pooling)} must be a non-empty subset of {list(OPS)}")
        if not 0 < assignment_threshold < 1:
            raise ValueError(f"assignment_threshold={assignment_threshold} must be strictly between 0 and 1")
        if local and "fit" not in pooling:
            raise ValueError(
                "local coordinates are relative to the fitted track: add `fit` to the pooling ops"
            )
        index = list(range(input_size)) if hit_fields_index is None else list(hit_fields_index)
        if not index or not all(0 <= i < input_size for i in index):
            raise ValueError(f"hit_fields_index {index} must be non-empty columns of the {input_size} inputs")
        self.register_buffer("hit_fields_index", torch.tensor(index, dtype=torch.long), persistent=False)
        self.threshold, self.assignment = assignment_threshold, assignment
        self.pooling = [op for op in pooling if op in POOLING]
        self.station, self.use_fit = "station" in pooling, "fit" in pooling
        self.anchor, self.local = anchor and self.use_fit, local
        if pull_loss < 0:
            raise ValueError(f"pull_loss={pull_loss} must be >= 0 (0: no pull-space loss)")
        # the loss of each field is divided by this share of its expected error (1: not at all)
        curvature = torch.tensor([f in CURVATURE for f in self.fields])
        self.register_buffer("pull_fields", curvature & (pull_loss > 0), persistent=False)
        anchored = torch.tensor([f in ANCHORS for f in self.fields])  # a buffer: no host copy per step
        self.register_buffer("anchored_fields", anchored, persistent=False)
        self.pull_loss = pull_loss
        self.detach_assignment = detach_assignment
        half = dim // 2
        raw_size = 2 * len(index) + (LOCAL_FEATURES if local else 0)  # values, validity flags, local frame
        self.pools_hits = bool(self.pooling) or self.station
        self.raw_net = mlp(raw_size, dim, half) if self.pools_hits else None
        self.hit_net = mlp(dim, dim, half) if self.pools_hits else None
        pooled = 2 * half * len(self.pooling)
        if self.station:  # two branches per station, and each station's share of the weight
            pooled += (2 * half + 1) * STATION_GROUPS
        if self.use_fit:  # the fit's outputs and its estimates of the targets
            pooled += FIT_FEATURES + len(self.fields)
        self.fit = (fit or TrackFit()) if self.use_fit else None
        self.uncertainty = TrackUncertainty() if self.use_fit else None  # per-track sigmas need the fit
        self.head = mlp(dim + pooled, hidden or 2 * dim, len(self.fields), layers=3)
        if self.anchor:  # start as the fit: the head learns corrections
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    def assignment_weights(
        self, hit_logit: torch.Tensor, hit_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, selected), both [b, n, m]; weights are p on the selected hits and 0 elsewhere."""
        p = torch.sigmoid(hit_logit.detach() if self.detach_assignment else hit_logit)
        return self.weights_from_probability(p, hit_valid)

    def weights_from_probability(
        self, p: torch.Tensor, hit_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        valid = hit_valid.unsqueeze(1)
        selected = (p >= self.threshold) & valid if self.assignment == "hard" else valid.expand_as(p)
        return p * selected, selected

    def forward(
        self,
        query: torch.Tensor,
        hits: torch.Tensor,
        hit_x: torch.Tensor,
        hit_x_valid: torch.Tensor,
        hit_valid: torch.Tensor,
        hit_logit: torch.Tensor | None = None,
        hit_geometry: torch.Tensor | None = None,
        hit_geometry_valid: torch.Tensor | None = None,
        hit_probability: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`hit_probability` [b, n, m] replaces sigmoid(hit_logit), e.g. the truth assignment (oracle).

        Runs in float32 whatever the autocast: raw hit values and the regression output carry the
        precision the physics needs.
        """
        with full_precision(query):
            if hit_probability is None:
                weights, selected = self.assignment_weights(hit_logit.float(), hit_valid)
            else:
                weights, selected = self.weights_from_probability(hit_probability.float(), hit_valid)
            query, hits, hit_x = query.float(), hits.float(), hit_x.float()
            parts = [query]
            fit = None
            if (self.use_fit or self.station) and hit_geometry is None:
                raise ValueError("the station and fit pooling ops need the batch's hit_geometry")
            if self.use_fit:
                fit = self.fit(hit_geometry, weights * hit_geometry_valid.unsqueeze(1))
                parts.append(self._fit_features(fit))
            if self.pools_hits:
                raw = torch.cat(
                    [
                        hit_x[..., self.hit_fields_index],
                        hit_x_valid[..., self.hit_fields_index].to(hit_x.dtype),
                    ],
                    dim=-1,
                )
                groups = None
                if self.station:
                    station = hit_geometry[..., G["station"]].long()
                    groups = nn.functional.one_hot(station, STATION_GROUPS).to(weights)
                    groups = groups * hit_geometry_valid.unsqueeze(-1)
                parts += self._pooled_hits(raw, hits, weights, selected, groups, fit)
            if self.use_fit:
                anchor = self._anchor(fit).detach().float()
                parts.append(anchor)
            out = {"track_regression": self.head(torch.cat(parts, dim=-1))}
            if not self.use_fit:
                return out
            out["track_fit_sigma"] = fit_errors(fit, expected_errors(fit)).float()
            if not self.anchor:
                return out
            scale = self._correction_scale(fit).float()
            out["track_regression"] = anchor + out["track_regression"] * scale
            if not self.pull_loss:
                return out
            # dividing a field's error by scale / sqrt(weight) weights its squared pull by `pull_loss`
            loss_scale = torch.where(self.pull_fields, scale / self.pull_loss**0.5, torch.ones_like(scale))
            return {**out, "track_regression_scale": loss_scale}

    def _pooled_hits(
        self,
        raw: torch.Tensor,
        hits: torch.Tensor,
        weights: torch.Tensor,
        selected: torch.Tensor,
        groups: torch.Tensor | None,
        fit: dict[str, torch.Tensor] | None,
    ) -> list[torch.Tensor]:
        """The raw and encoded hit branches pooled over each track's hits, and per station (`groups`,
        one-hot [b, m, stations]) with each station's share of the track's weight."""
        raw_features = self.raw_net(self._with_local_frame(raw, fit) if self.local else raw)
        hit_features = self.hit_net(hits)
        parts = [
            pooled
            for features in (raw_features, hit_features)
            for pooled in self.pool(features, weights, selected)
        ]
        if groups is not None:
            share = torch.einsum("bnm,bms->bns", weights, groups)
            parts.append(share / share.sum(-1, keepdim=True).clamp(min=WEIGHT_FLOOR))
            parts += [
                _station_mean(features, weights, groups, share) for features in (raw_features, hit_features)
            ]
        return parts

    def pool(
        self, features: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor
    ) -> list[torch.Tensor]:
        if features.ndim == 4:  # per (track, hit) features: pool each track's own
            return [_per_track(POOLING[op], features, weights, selected) for op in self.pooling]
        return [POOLING[op](features, weights, selected) for op in self.pooling]

    def _anchor(self, fit: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fit's estimates of the targets, in the internal space (the mean, 0, where it has none)."""
        physical = torch.stack(
            [ANCHORS[f](fit) if f in ANCHORS else torch.zeros_like(fit["qpt"]) for f in self.fields], -1
        ).to(self.space.mean.dtype)
        encoded = self.space.encode_values(physical).clamp(-ANCHOR_LIMIT, ANCHOR_LIMIT)
        return torch.where(self.anchored_fields, encoded, torch.zeros_like(encoded))

    def _correction_scale(self, fit: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fit's expected error of each target (`expected_errors`) in the internal space [b, n, fields]."""
        sigma = expected_errors(fit)
        columns = []
        for i, field in enumerate(self.fields):
            # the Python list, not the buffer: no data-dependent branch (torch.export, ONNX)
            inverted_pt = field == "truthMuon_pt" and field in self.space.inverse_fields
            scale = sigma["truthMuon_qpt"] if inverted_pt else sigma.get(field)  # inverted pT's space: 1/pT
            columns.append(
                torch.ones_like(fit["p"])
                if scale is None
                else (scale / self.space.std[i]).clamp(*SCALE_RANGE)
            )
        return torch.stack(columns, -1)

    @staticmethod
    def _fit_features(fit: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fit's outputs on scales of order one."""
        return torch.stack(
            [
                fit["qp"] * 10,
                torch.log10(fit["qp_sigma"]),  # > 0: the fit's priors bound the covariance
                fit["eta"],
                fit["cos_phi"],
                fit["sin_phi"],
                fit["position"],
                fit["slope"],
                torch.log1p(fit["chi2_ndf"]),
                fit["hits"] / 30,
                fit["qpt"] * 10,
            ],
            -1,
        ).float()

    def _with_local_frame(self, raw: torch.Tensor, fit: dict[str, torch.Tensor]) -> torch.Tensor:
        """raw [b, m, f] -> [b, n, m, f + 3]: each hit also in each track's frame (from the fit)."""
        local = fit["local"].to(raw.dtype)  # [b, n, m, 3]
        return torch.cat([raw.unsqueeze(1).expand(-1, local.shape[1], -1, -1), local], -1)


@torch.no_grad()
def expected_errors(fit: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Expected error of the fit's estimate of each target, in physical units [b, n]: q/pT from the
    fit's covariance and the energy loss's spread; the angles from the nominal precision of the
    spectrometer and the calorimeter's scattering (the linearised covariance of a direction is not
    trusted to scale a correction). The anchor's scale and the base of the per-track uncertainties."""
    cosh, p = portable.cosh(fit["eta"]), fit["p"]
    sigma_qpt = cosh * torch.sqrt(fit["qp_sigma"] ** 2 + (det.ENERGY_LOSS_SPREAD / p**2) ** 2)
    sigma_angle = torch.sqrt(ANGLE_MEASUREMENT**2 + (det.CALO_SCATTERING / p) ** 2)
    return {
        "truthMuon_eta": cosh * sigma_angle,
        "truthMuon_phi": torch.sqrt(sigma_angle**2 + (det.SOLENOID_PHI_KICK * sigma_qpt) ** 2),
        "truthMuon_qpt": sigma_qpt,
        "truthMuon_pt": sigma_qpt / fit["qpt"].abs().clamp(min=sigma_qpt) ** 2,  # pT^2 sigma(1/pT)
    }


def _station_mean(
    features: torch.Tensor, weights: torch.Tensor, groups: torch.Tensor, share: torch.Tensor
) -> torch.Tensor:
    """Weighted mean of each track's hit features per station group -> [b, n, groups * d]."""
    if features.ndim == 4:
        total = torch.einsum("bnm,bms,bnmd->bnsd", weights, groups, features)
    else:
        total = torch.einsum("bnm,bms,bmd->bnsd", weights, groups, features)
    mean = total / share.unsqueeze(-1).clamp(min=WEIGHT_FLOOR)
    return mean.flatten(-2)


def _per_track(op, features: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """A pooling op on per-(track, hit) features [b, n, m, d]: track n pools its own row."""
    b, n, m, d = features.shape
    out = op(features.reshape(b * n, m, d), weights.reshape(b * n, 1, m), selected.reshape(b * n, 1, m))
    return out.reshape(b, n, d)

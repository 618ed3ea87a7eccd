"""Hit assignment refined by a track fit: a hit far from its track is not its hit.

The decoder's hit-mask logits judge each hit by attention over embeddings; a track fit judges it
by geometry. Hits wrongly assigned (noise tubes in the same chamber, delta-ray neighbours) lie
centimetres from the fitted track, true hits a fraction of a millimetre: their pulls (residual
over resolution) differ by orders of magnitude (measured: median 9.5 against 0.2). So each query's
hits are fitted (weights = the first-stage assignment), and a small net turns each hit's pull,
its distance across the track, its first-stage logit and its kind into a correction of that logit.
The corrected logits are the task's output; the first-stage ones are trained too (`stage0_hit_logit`).
"""

from __future__ import annotations

import torch
from torch import nn

from muonreg.data.geometry import G
from muonreg.models.layers import full_precision, mlp
from muonreg.tasks.track_fit import TrackFit


class FitRefinedAssignment(nn.Module):
    """logit [b, n, m] -> logit + net(pull, across, logit, kind) over each query's fitted track."""

    def __init__(self, threshold: float = 0.1, hidden: int = 16, fit: TrackFit | None = None):
        super().__init__()
        self.threshold = threshold
        self.fit = fit or TrackFit()
        self.net = mlp(4, hidden, 1)
        nn.init.zeros_(self.net[-1].weight)  # starts as the first stage
        nn.init.zeros_(self.net[-1].bias)

    def forward(
        self,
        logit: torch.Tensor,
        geometry: torch.Tensor,
        geometry_valid: torch.Tensor,
        hit_valid: torch.Tensor,
    ) -> torch.Tensor:
        with full_precision(logit):
            logit = logit.float()
            p = torch.sigmoid(logit)
            usable = (p >= self.threshold) & (hit_valid & geometry_valid).unsqueeze(1)
            local = self.fit(geometry, p * usable)["local"].float()  # [b, n, m, 3]: along, across, pull
            kind = geometry[..., G["mdt"]].unsqueeze(1).expand_as(logit).float()
            features = torch.stack([local[..., 2], local[..., 1], logit.detach(), kind], -1)
            return logit + self.net(features).squeeze(-1)

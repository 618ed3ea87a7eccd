"""The MaskFormer muon tracker: hit input net, encoder, mask-attention decoder, and its tasks.

Task outputs flow forward explicitly: the regression task receives the hit-mask task's logits
as an argument. Outputs whose key starts with `track_` or `query_` have the query axis at dim 1;
`align` permutes exactly those into truth order after matching.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from muonreg.models.decoder import Decoder
from muonreg.models.encoder import Encoder
from muonreg.models.layers import Standardize, full_precision, mlp
from muonreg.models.matching import Matcher

if TYPE_CHECKING:  # the tasks build on models.layers; import them for annotations only
    from muonreg.tasks import ObjectHitMaskTask, ObjectValidTask
    from muonreg.tasks.refine import FitRefinedAssignment
    from muonreg.tasks.regression import RegressionTask

QUERY_AXIS_PREFIXES = ("track_", "query_")


class MaskFormer(nn.Module):
    """Hits -> encoder -> decoder queries -> tasks; `loss` matches queries to truth first."""

    def __init__(
        self,
        input_size: int,
        *,
        dim: int = 32,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        heads: int = 8,
        num_queries: int = 2,
        mask_threshold: float = 0.1,
        dropout: float = 0.0,
        valid_task: ObjectValidTask,
        hit_mask_task: ObjectHitMaskTask,
        regression_task: RegressionTask,
        matcher: Matcher | None = None,
        aux_loss: bool = False,
        refine: FitRefinedAssignment | None = None,
    ):
        super().__init__()
        # The input net sees every (standardised) feature value and its validity flag: 2 * input_size inputs.
        self.input_norm = Standardize(input_size)
        self.input_net = mlp(2 * input_size, dim, dim)
        self.encoder = Encoder(dim, encoder_layers, heads, dropout)
        self.decoder = Decoder(dim, decoder_layers, heads, num_queries, dropout)
        self.valid_task, self.hit_mask_task, self.regression_task = valid_task, hit_mask_task, regression_task
        self.num_queries, self.mask_threshold = num_queries, mask_threshold
        self.matcher = matcher or Matcher()
        self.aux_loss = aux_loss
        self.refine = refine

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hit_x_valid, hit_valid = batch["hit_x_valid"], batch["hit_valid"]
        # missing values are 0 after standardising, so no sentinel or NaN ever reaches a layer
        hit_x = self.input_norm(batch["hit_x"].float(), hit_x_valid)
        with full_precision(hit_x):  # the hits' coordinates enter in float32, whatever the autocast
            x = self.input_net(torch.cat([hit_x, hit_x_valid.to(hit_x.dtype)], dim=-1))
        hits = self.encoder(x, hit_valid)
        keys = self.hit_mask_task.hit_keys(hits)
        states = self.decoder(
            hits, hit_valid, lambda q: self.hit_mask_task.claimed(q, keys, self.mask_threshold)
        )
        query = states[-1]
        outputs = {"query_embed": query, "hit_embed": hits}
        if self.aux_loss and self.training:  # deep supervision of the earlier decoder layers
            for i, state in enumerate(states[:-1]):
                outputs[f"aux{i}_valid_logit"] = self.valid_task(state)["track_valid_logit"]
                outputs[f"aux{i}_hit_logit"] = self.hit_mask_task(state, keys)["track_hit_logit"]
        outputs.update(self.valid_task(query))
        outputs.update(self.hit_mask_task(query, keys))
        if self.refine is not None:  # the fit's verdict on each hit corrects the first-stage assignment
            outputs["track_stage0_hit_logit"] = outputs["track_hit_logit"]
            outputs["track_hit_logit"] = self.refine(
                outputs["track_hit_logit"], batch["hit_geometry"], batch["hit_geometry_valid"], hit_valid
            )
        outputs.update(
            self.regression_task(
                query=query,
                hit_logit=outputs["track_hit_logit"],
                **self._regression_inputs(batch, hits, hit_x),
            )
        )
        return outputs

    @staticmethod
    def _regression_inputs(
        batch: dict[str, torch.Tensor], hits: torch.Tensor, hit_x: torch.Tensor
    ) -> dict[str, torch.Tensor | None]:
        return {
            "hits": hits,
            "hit_x": hit_x,
            "hit_x_valid": batch["hit_x_valid"],
            "hit_valid": batch["hit_valid"],
            "hit_geometry": batch.get("hit_geometry"),
            "hit_geometry_valid": batch.get("hit_geometry_valid"),
        }

    @torch.no_grad()
    def oracle_regression(
        self, aligned: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Track parameters in physical units as the regression would give them with the truth hit
        assignment (truth slot j's hits, weight 1) and each slot's matched query: what the
        regression can do when the assignment is perfect. `aligned` is in truth order (see align)."""
        if not hasattr(self.regression_task, "weights_from_probability"):
            return {}
        truth = self.truth(batch)
        hit_x = self.input_norm(batch["hit_x"], batch["hit_x_valid"])
        out = self.regression_task(
            query=aligned["query_embed"],
            hit_probability=truth["particle_hit_valid"].to(hit_x.dtype),
            **self._regression_inputs(batch, aligned["hit_embed"], hit_x),
        )
        return self.regression_task.predict(out)

    def truth(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Truth slots padded to num_queries (extra slots are empty)."""
        slots = batch["particle_valid"].shape[1]
        if slots > self.num_queries:
            raise ValueError(
                f"{slots} truth slots but only num_queries={self.num_queries}; raise model.num_queries"
            )
        pad = self.num_queries - slots
        return {
            k: F.pad(v, (0, 0, 0, pad) if v.ndim == 3 else (0, pad))
            for k, v in batch.items()
            if k.startswith("particle_")
        }

    @torch.no_grad()
    def match(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """perm [b, num_queries]: the query assigned to each (padded) truth slot."""
        truth = self.truth(batch)
        cost = self.valid_task.cost_weight * self.valid_task.cost(outputs, truth)
        cost = cost + self.hit_mask_task.cost_weight * self.hit_mask_task.cost(
            outputs, truth, batch["hit_valid"]
        )
        return self.matcher(cost.float())

    @staticmethod
    def align(outputs: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
        """Permute per-query outputs so that query slot j is the one matched to truth slot j."""
        aligned = {}
        for key, value in outputs.items():
            if key.startswith(QUERY_AXIS_PREFIXES):
                index = perm.view(*perm.shape, *([1] * (value.ndim - 2))).expand(-1, -1, *value.shape[2:])
                value = value.gather(1, index)
            aligned[key] = value
        return aligned

    def loss(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Match, align, then each task's loss; `loss` is their weighted sum."""
        truth = self.truth(batch)
        aligned = self.align(outputs, self.match(outputs, batch))
        parts = [
            (self.valid_task.loss_weight, self.valid_task.loss(aligned, truth)),
            (self.hit_mask_task.loss_weight, self.hit_mask_task.loss(aligned, truth, batch["hit_valid"])),
            (self.regression_task.loss_weight, self.regression_task.loss(aligned, truth)),
        ]
        if "track_stage0_hit_logit" in aligned:  # the assignment before the fit's refinement
            stage0 = {"track_hit_logit": aligned["track_stage0_hit_logit"]}
            bce = self.hit_mask_task.loss(stage0, truth, batch["hit_valid"])["track_hit_bce"]
            parts.append((self.hit_mask_task.loss_weight, {"stage0_hit_bce": bce}))
        losses = {name: value for _, part in parts for name, value in part.items()}
        losses["loss"] = sum(weight * value for weight, part in parts for value in part.values())
        aux_layers = [i for i in range(len(self.decoder.layers) - 1) if f"aux{i}_valid_logit" in outputs]
        if aux_layers:
            losses["aux_loss"] = sum(self._aux_loss(outputs, batch, truth, i) for i in aux_layers) / len(
                aux_layers
            )
            losses["loss"] = losses["loss"] + losses["aux_loss"]
        return losses

    def _aux_loss(
        self,
        outputs: dict[str, torch.Tensor],
        batch: dict[str, torch.Tensor],
        truth: dict[str, torch.Tensor],
        i: int,
    ) -> torch.Tensor:
        """Validity and hit-mask loss of decoder layer i's queries, matched on their own."""
        layer = {
            "track_valid_logit": outputs[f"aux{i}_valid_logit"],
            "track_hit_logit": outputs[f"aux{i}_hit_logit"],
        }
        aligned = self.align(layer, self.match(layer, batch))
        valid = self.valid_task.loss(aligned, truth)["track_valid_bce"]
        mask = self.hit_mask_task.loss(aligned, truth, batch["hit_valid"])["track_hit_bce"]
        return self.valid_task.loss_weight * valid + self.hit_mask_task.loss_weight * mask

    def predict(self, outputs: dict[str, torch.Tensor], hit_valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Track validity, hit assignment and parameters in physical units."""
        return {
            **self.valid_task.predict(outputs),
            **self.hit_mask_task.predict(outputs, hit_valid),
            **self.regression_task.predict(outputs),
        }

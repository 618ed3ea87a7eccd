"""Query decoder with mask attention: each query looks only at the hits it currently claims."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from muonreg.models.layers import Attention, attendable, mlp


class DecoderLayer(nn.Module):
    """Pre-norm query<-hit cross-attention (masked), query self-attention, MLP."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm_q, self.norm_h = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = Attention(dim, heads, dropout)
        self.norm_s = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.norm_m = nn.LayerNorm(dim)
        self.mlp = mlp(dim, 2 * dim, dim, dropout=dropout)

    def forward(self, q: torch.Tensor, hits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = q + self.cross(self.norm_q(q), self.norm_h(hits), mask)
        y = self.norm_s(q)
        q = q + self.self_attn(y, y)
        return q + self.mlp(self.norm_m(q))


class Decoder(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, num_queries: int, dropout: float = 0.0):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        hits: torch.Tensor,
        hit_valid: torch.Tensor,
        claimed: Callable[[torch.Tensor], torch.Tensor],
    ) -> list[torch.Tensor]:
        """The (normalised) queries after each layer; the last entry is the decoder's output.

        `claimed(q)` -> bool [b, n, m]: the hits each query may attend to, judged on the current
        (normalised) queries by the same heads that make the final hit assignment.
        """
        q = self.queries.unsqueeze(0).expand(hits.shape[0], -1, -1).to(hits.dtype)
        states = []
        for layer in self.layers:
            with torch.no_grad():
                mask = attendable(claimed(self.norm(q)) & hit_valid.unsqueeze(1), hit_valid)
            q = layer(q, hits, mask)
            states.append(self.norm(q))
        return states

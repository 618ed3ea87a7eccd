"""Transformer encoder over the hits of an event, with a key-padding mask; full attention, or local
windows over hits sorted by a coordinate (`window`, for events of thousands of hits)."""

from __future__ import annotations

import torch
from torch import nn

from muonreg.models.layers import Attention, WindowedAttention, attendable, mlp


class EncoderLayer(nn.Module):
    """Pre-norm self-attention (over all hits, or in windows of `window` sorted hits) + MLP."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, window: int | None = None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = (
            Attention(dim, heads, dropout)
            if window is None
            else WindowedAttention(dim, heads, window, dropout)
        )
        self.mlp = mlp(dim, 2 * dim, dim, dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, mask)
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, dropout: float = 0.0, window: int | None = None):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, dropout, window) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, hit_valid: torch.Tensor) -> torch.Tensor:
        """x [b, m, d]; hit_valid [b, m]. Padded hits never influence real ones."""
        mask = attendable(hit_valid.unsqueeze(1), hit_valid)  # [b, 1, m]: key padding only
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)

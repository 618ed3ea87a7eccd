"""Building blocks: an MLP and multi-head attention on torch's fused scaled_dot_product_attention."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_size: int, hidden: int, out_size: int, layers: int = 2, dropout: float = 0.0) -> nn.Sequential:
    """Linear-GELU stack with `layers` linear maps (the last one without activation)."""
    sizes = [in_size] + [hidden] * (layers - 1) + [out_size]
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        modules.append(nn.Linear(a, b))
        if i < layers - 1:
            modules += [nn.GELU(), nn.Dropout(dropout)] if dropout else [nn.GELU()]
    return nn.Sequential(*modules)


def full_precision(x: torch.Tensor) -> torch.autocast:
    """A region outside any autocast: geometry and physics outputs stay float32 under bf16 training.

    bf16 keeps 8 bits of mantissa: a hit coordinate of 8 m becomes 8 m +- 3 cm, and a q/pT of
    1/150 GeV loses 0.5 %; the attention layers lose nothing that matters in bf16, these do.
    """
    return torch.autocast(device_type=x.device.type, enabled=False)


def attendable(mask: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Make every query row of a boolean mask [b, q, k] attend somewhere.

    A row with no allowed key would give softmax over nothing (NaN); it attends to every valid
    key instead, and to every key when the event has no valid key at all (padding only).
    """
    keys = key_valid.unsqueeze(1)  # [b, 1, k]
    keys = keys | ~keys.any(-1, keepdim=True)
    # mask where the row allows a key, else keys: boolean algebra rather than a `where` on booleans,
    # which ONNX Runtime does not implement (muonreg.export)
    return mask | (keys & ~mask.any(-1, keepdim=True))


# CUDA's fused attention kernels (memory-efficient, cuDNN, flash) take 16-bit head dims that are multiples of 8.
FUSED_HEAD_MULTIPLE = 8


class Attention(nn.Module):
    """Multi-head attention; `mask` [b, q, k] (or broadcastable [b, 1, k]) is True where allowed.

    Head dims that are not a multiple of 8 (the reference's dim 32 with 8 heads: 4) would send CUDA
    to the math kernel, which materialises [b, heads, q, k] scores; `pad_heads` (default: on CUDA)
    pads q, k and v with zeros to the next multiple, which changes no score and no output.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, pad_heads: bool | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout
        self.pad_heads = pad_heads

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.attend(self.q(x), self.kv(context), mask)

    def attend(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of projected queries q [b, n, d] over projected keys and values kv [b, k, 2d]."""
        b, n, d = q.shape
        h, e = self.heads, d // self.heads
        q = q.view(b, n, h, e).transpose(1, 2)
        k, v = kv.view(b, kv.shape[1], 2, h, e).permute(2, 0, 3, 1, 4)
        pad = -e % FUSED_HEAD_MULTIPLE if (q.is_cuda if self.pad_heads is None else self.pad_heads) else 0
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        attn_mask = None if mask is None else mask.unsqueeze(1)  # broadcast over heads
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, scale=e**-0.5
        )
        return self.out(y[..., :e].transpose(1, 2).reshape(b, n, d))


def neighbour_blocks(x: torch.Tensor, window: int) -> torch.Tensor:
    """[b, m, ...] -> [b * blocks, 3 * window, ...]: each block of `window` consecutive entries with
    the block before and the block after it (zeros beyond the ends; m padded to whole blocks)."""
    b, m = x.shape[:2]
    blocks = -(-m // window)
    pad = torch.zeros(b, window + blocks * window - m, *x.shape[2:], dtype=x.dtype, device=x.device)
    front = torch.zeros(b, window, *x.shape[2:], dtype=x.dtype, device=x.device)
    padded = torch.cat([front, x, pad], dim=1).view(b, blocks + 2, window, *x.shape[2:])
    around = torch.cat([padded[:, :-2], padded[:, 1:-1], padded[:, 2:]], dim=2)
    return around.reshape(b * blocks, 3 * window, *x.shape[2:])


class WindowedAttention(Attention):
    """Self-attention in local windows, for events of thousands of hits.

    The hits, already sorted by a coordinate (HitFilter sorts them by phi), are cut into blocks of
    `window`; each hit attends to the hits of its own block and of the two neighbouring blocks, so
    memory and time grow linearly with the number of hits (at most [b * blocks, heads, window,
    3 window] scores, on the fused kernel none) rather than with its square. With a window at least
    as long as the event this is full attention. Same weights as Attention.
    """

    def __init__(self, dim: int, heads: int, window: int, dropout: float = 0.0):
        super().__init__(dim, heads, dropout)
        if window < 1:
            raise ValueError(f"window={window} must be a positive number of hits")
        self.window = window

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Self-attention only (`context` is `x`); `mask` [b, 1, m]: the valid keys (padding False)."""
        b, m, d = x.shape
        w = self.window
        valid = torch.ones(b, m, dtype=torch.bool, device=x.device) if mask is None else mask[:, 0]
        blocks = -(-m // w)
        q = self.q(x)
        q = torch.cat([q, q.new_zeros(b, blocks * w - m, d)], dim=1).view(b * blocks, w, d)
        keys_valid = neighbour_blocks(valid, w)  # [b * blocks, 3w]
        # keys and values projected once per hit, then gathered per window
        y = self.attend(q, neighbour_blocks(self.kv(x), w), attendable(keys_valid.unsqueeze(1), keys_valid))
        return y.view(b, blocks * w, d)[:, :m]


class Standardize(nn.Module):
    """Per-feature standardisation of the hit inputs, fitted on training data and saved with the model.

    The reference scaling leaves inputs on very different scales (time x1e-5 and covariances x1e-6
    are nearly invisible, drift radii in mm beside positions in m); (x - mean) / std over the
    measured values puts every feature on one scale. Missing values stay 0.
    """

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("std", torch.ones(size))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, valid: torch.Tensor) -> None:
        """x, valid [..., size]: statistics over the valid entries of each feature."""
        x, valid = x.reshape(-1, x.shape[-1]).double(), valid.reshape(-1, valid.shape[-1])
        count = valid.sum(0).clamp(min=1)
        mean = torch.where(valid, x, 0.0).sum(0) / count
        var = torch.where(valid, (x - mean) ** 2, 0.0).sum(0) / count
        std = var.sqrt()
        self.mean.copy_(mean.float())
        self.std.copy_(torch.where(std > 0, std, torch.ones_like(std)).float())

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, (x - self.mean) / self.std, torch.zeros_like(x))

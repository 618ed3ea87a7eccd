"""On a GPU: the model's attention runs on a fused kernel in bf16 (skipped without CUDA)."""

import pytest
import torch

from muonreg.models.layers import Attention, attendable

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dim, heads", [(64, 4), (32, 4), (32, 8)])  # (32, 8): the default, padded
def test_masked_attention_runs_on_the_memory_efficient_kernel_in_bf16(dim, heads):
    """Memory-efficient attention takes boolean masks and head dims divisible by 8 in bf16 (smaller
    ones are padded on CUDA); if the layout did not qualify, `sdpa_kernel` restricted to it would
    raise instead of falling back to the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda")
    attention = Attention(dim, heads).to(device)
    x = torch.randn(8, 300, dim, device=device)
    valid = torch.arange(300, device=device) < torch.randint(50, 300, (8, 1), device=device)
    mask = attendable(valid.unsqueeze(1), valid)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        out = attention(x, x, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()

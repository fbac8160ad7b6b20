import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, for a tensor holding [gate, up] along its last dimension: a Triton kernel on CUDA."""
    if x.is_cuda:
        from nanovllm.kernels.activation import silu_and_mul as kernel  # triton is Linux-only
        return kernel(x)
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """silu(gate) * up, for a tensor holding [gate, up] along its last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)

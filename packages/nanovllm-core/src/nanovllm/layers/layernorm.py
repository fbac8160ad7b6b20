import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise ``x``; with ``residual``, normalise ``x + residual`` and also return that sum."""
        if residual is not None:
            x = residual = x + residual  # in the model dtype, as Hugging Face does
        variance = x.float().pow(2).mean(-1, keepdim=True)
        y = (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight
        return y if residual is None else (y, residual)

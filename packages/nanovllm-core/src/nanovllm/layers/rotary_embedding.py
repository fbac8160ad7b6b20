"""Rotary position embedding (neox style), plain or with Llama 3 frequency scaling."""
import math

import torch
from torch import nn

from nanovllm.layers.layernorm import RMSNorm


def rope_parameters(hf_config) -> tuple[float, dict]:
    """(rope_theta, scaling dict) from a config of transformers 4.x (rope_scaling) or 5.x (rope_parameters)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or 10000.0
    return float(theta), params


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict):
        super().__init__()
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type != "default":
            raise ValueError(f"rope_type={rope_type!r} is not supported; supported: default, llama3")
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float, device="cpu"), inv_freq)
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_device()), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                norms: tuple[RMSNorm, RMSNorm] | None = None):
        """Rotate q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] by position, after normalising each
        head with ``norms`` (q's, k's) where the model has QK norms."""
        if q.is_cuda:  # norms and rotation in one Triton kernel (triton is imported only where it runs)
            from nanovllm.kernels.rotary import rotate_queries_keys
            return rotate_queries_keys(positions, q, k, self.cos_sin_cache, norms)
        if norms:
            q, k = norms[0](q), norms[1](k)
        return apply_rotary(positions, q, k, self.cos_sin_cache)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor):
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def get_rope(head_dim: int, max_position: int, hf_config) -> RotaryEmbedding:
    base, scaling = rope_parameters(hf_config)
    return RotaryEmbedding(head_dim, max_position, base, scaling)

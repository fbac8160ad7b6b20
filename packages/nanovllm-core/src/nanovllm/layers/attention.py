import torch
from torch import nn

from nanovllm.engine.context import get_context


class Attention(nn.Module):
    """Paged attention over this layer's KV cache; the engine wires in the backend, the cache and the index."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.backend = None  # an AttentionBackend instance, set by the model runner
        self.kv_cache = torch.tensor([])
        self.layer_index = 0  # among the model's attention layers, set by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [tokens, heads, head_dim]; returns [tokens, heads * head_dim]."""
        context = get_context()
        o = self.backend.forward(q, k, v, self.kv_cache, context)
        if context.compaction is not None:  # prompts complete: keep what the retention policy chooses
            context.compaction.apply(self.layer_index, q, self.kv_cache, self.scale)
        return o.flatten(-2)

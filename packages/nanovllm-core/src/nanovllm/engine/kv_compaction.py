"""Keeping what a KV-retention policy chooses: in the step that completes a prompt, right after each layer's
attention, the kept K and V of each KV head are gathered into the sequence's fresh blocks."""
from dataclasses import dataclass

import torch

from nanovllm.kv_retention import KVRetentionPolicy


@dataclass
class KVCompaction:
    """The prompts that complete in this step and are compacted, one entry per sequence."""

    policy: KVRetentionPolicy
    query_rows: list[tuple[int, int]]  # rows [first, end) of the step's tokens: the prompt's last queries
    prompt_block_tables: list[torch.Tensor]  # int64: the blocks holding the prompt's K and V
    num_prompt_tokens: list[int]
    num_kept: list[int]
    kept_block_tables: list[torch.Tensor]  # int64: fresh blocks for the kept entries

    def apply(self, layer: int, q: torch.Tensor, kv_cache: torch.Tensor, scale: float):
        """Copy each sequence's kept K and V of ``layer`` (cache [2, blocks, block_size, kv_heads, head_dim])
        into its fresh blocks, in position order."""
        block_size, num_kv_heads = kv_cache.size(2), kv_cache.size(3)
        slots = kv_cache.flatten(1, 2)  # [2, slots, kv_heads, head_dim], a view of the cache
        heads = torch.arange(num_kv_heads, device=q.device).unsqueeze(1)
        offsets = torch.arange(block_size, device=q.device)
        for (first, end), blocks, num_prompt, num_kept, kept_blocks in zip(
                self.query_rows, self.prompt_block_tables, self.num_prompt_tokens, self.num_kept,
                self.kept_block_tables):
            keys = kv_cache[0][blocks].flatten(0, 1)[:num_prompt]
            positions = self.policy.select(layer, q[first:end], keys, num_kept, scale)
            if positions.shape != (num_kv_heads, num_kept):
                raise ValueError(f"KV-retention policy {self.policy.name!r} selected a {tuple(positions.shape)} "
                                 f"tensor; it must select [num_kv_heads, num_kept] = [{num_kv_heads}, {num_kept}]")
            positions = positions.sort(dim=-1).values
            source = blocks[positions // block_size] * block_size + positions % block_size  # [kv_heads, kept]
            target = (kept_blocks.unsqueeze(1) * block_size + offsets).flatten()[:num_kept]
            slots[:, target.unsqueeze(0), heads] = slots[:, source, heads]

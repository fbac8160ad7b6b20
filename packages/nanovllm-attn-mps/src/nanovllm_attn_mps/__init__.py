"""Pure-PyTorch paged attention: the nanovllm backend on Apple MPS and the CPU fallback."""
import torch
import torch.nn.functional as F

import nanovllm
from nanovllm import Context


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor):
    """Write each token's K and V to its slot (block id * block size + offset); slot -1 is skipped."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    kv_cache[0].view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def _pad_by_sequence(x: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
    """[tokens, heads, dim] in varlen layout -> [seqs, max_len, heads, dim], zero padded."""
    num_seqs = cu_seqlens.numel() - 1
    lens = cu_seqlens.diff()
    seq_idx = torch.repeat_interleave(torch.arange(num_seqs, device=x.device), lens)
    local = torch.arange(x.size(0), device=x.device) - cu_seqlens[:-1].long()[seq_idx]
    out = x.new_zeros(num_seqs, max_len, *x.shape[1:])
    out[seq_idx, local] = x
    return out


class TorchPagedAttention(nanovllm.AttentionBackend):
    """Gathers each sequence's keys from its block table and runs masked SDPA, padded by sequence."""

    name = "mps"
    priority = 10
    device_types = ("mps", "cpu", "cuda")
    default_device_types = ("mps", "cpu")  # on CUDA only when asked for by name: flash-attn is the fast path

    def forward(self, q, k, v, kv_cache, context: Context):
        lens_q = context.cu_seqlens_q.diff()
        if kv_cache.numel():
            store_kv(k, v, kv_cache, context.slot_mapping)
            num_seqs, max_blocks = context.block_tables.shape
            block_size = kv_cache.size(2)
            keys = kv_cache[0][context.block_tables].view(num_seqs, max_blocks * block_size, *k.shape[1:])
            values = kv_cache[1][context.block_tables].view(num_seqs, max_blocks * block_size, *v.shape[1:])
            keys, values = keys[:, :context.max_seqlen_k], values[:, :context.max_seqlen_k]
            lens_k = context.context_lens.long()
        else:  # warm-up: every sequence attends to its own new tokens only
            keys = _pad_by_sequence(k, context.cu_seqlens_q, context.max_seqlen_q)
            values = _pad_by_sequence(v, context.cu_seqlens_q, context.max_seqlen_q)
            lens_k = lens_q.long()
        queries = _pad_by_sequence(q, context.cu_seqlens_q, context.max_seqlen_q)
        # Query i of a sequence sits at position lens_k - lens_q + i and sees keys up to there.
        pos_q = torch.arange(queries.size(1), device=q.device) + (lens_k - lens_q).unsqueeze(1)
        pos_k = torch.arange(keys.size(1), device=q.device)
        mask = (pos_k[None, None, :] <= pos_q[:, :, None]) & (pos_k[None, None, :] < lens_k[:, None, None])
        group = self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2), keys.transpose(1, 2).repeat_interleave(group, 1),
            values.transpose(1, 2).repeat_interleave(group, 1), attn_mask=mask.unsqueeze(1), scale=self.scale)
        out = out.transpose(1, 2)  # [seqs, max_q, heads, dim]
        seq_idx = torch.repeat_interleave(torch.arange(lens_q.numel(), device=q.device), lens_q)
        local = torch.arange(q.size(0), device=q.device) - context.cu_seqlens_q[:-1].long()[seq_idx]
        return out[seq_idx, local]


@nanovllm.hookimpl
def register_attention_backends(register):
    register(TorchPagedAttention)

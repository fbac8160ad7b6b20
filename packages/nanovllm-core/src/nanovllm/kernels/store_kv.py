"""A Triton kernel that writes each new token's K and V into its slot of the paged cache."""
import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_stride, v_stride, k_cache_ptr, v_cache_ptr, slot_ptr,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:  # -1 marks padding (CUDA-graph batches) and warm-up tokens
        offsets = tl.arange(0, BLOCK)
        mask = offsets < ROW
        k = tl.load(k_ptr + token * k_stride + offsets, mask=mask)
        v = tl.load(v_ptr + token * v_stride + offsets, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + offsets, k, mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offsets, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor):
    """k, v: [tokens, kv_heads, head_dim], each token's heads contiguous; kv_cache: [2, blocks, block_size, kv_heads, head_dim]."""
    num_tokens, num_heads, head_dim = k.shape
    row = num_heads * head_dim
    assert k.stride(-1) == 1 and k.stride(1) == head_dim and v.stride(-1) == 1 and v.stride(1) == head_dim
    assert kv_cache.is_contiguous() and slot_mapping.numel() == num_tokens
    _store_kv_kernel[(num_tokens,)](k, v, k.stride(0), v.stride(0), kv_cache[0], kv_cache[1], slot_mapping,
                                    ROW=row, BLOCK=triton.next_power_of_2(row))

"""A Triton kernel that rotates each token's queries and keys by its position (neox-style rotary embedding), first
RMS-normalising each head where the model has QK norms (Qwen3): one launch per layer where compiled PyTorch takes
one for each norm and each rotation."""
import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rotate_heads(x_ptr, x_stride, out_ptr, weight_ptr, token, cos, sin, eps, NUM_HEADS: tl.constexpr,
                       HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, NORM: tl.constexpr):
    """One token's heads: x1 and x2 are each head's halves, which the rotation pairs."""
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (heads < NUM_HEADS)[:, None] & (offs < HALF)[None, :]
    at = heads[:, None] * (2 * HALF) + offs[None, :]
    x1 = tl.load(x_ptr + token * x_stride + at, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + token * x_stride + at + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    if NORM:  # rounded where RMSNorm rounds: after normalising, and after the weight
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(weight_ptr + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(weight_ptr + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    out = out_ptr + token * (NUM_HEADS * 2 * HALF) + at
    tl.store(out, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(out + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, q_stride, k_stride, q_out_ptr, k_out_ptr, positions_ptr, cos_sin_ptr, q_weight_ptr,
                   k_weight_ptr, q_eps, k_eps, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                   HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   NORM: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)  # token * stride may pass 2**31 in a large step
    offs = tl.arange(0, BLOCK_HALF)
    row = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * (2 * HALF)
    cos = tl.load(row + offs, mask=offs < HALF, other=0.0)[None, :]
    sin = tl.load(row + HALF + offs, mask=offs < HALF, other=0.0)[None, :]
    _norm_rotate_heads(q_ptr, q_stride, q_out_ptr, q_weight_ptr, token, cos, sin, q_eps, NUM_HEADS, HALF, BLOCK_HQ,
                       BLOCK_HALF, NORM)
    _norm_rotate_heads(k_ptr, k_stride, k_out_ptr, k_weight_ptr, token, cos, sin, k_eps, NUM_KV_HEADS, HALF, BLOCK_HK,
                       BLOCK_HALF, NORM)


def rotate_queries_keys(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                        norms: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] (each token's heads contiguous, as views of the
    QKV projection are) rotated by ``positions``, after the RMSNorm modules ``norms`` = (q's, k's) where given.
    cos_sin_cache: [positions, head_dim], each row the cosines then the sines. Returns new contiguous tensors."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(-1) == 1 and q.stride(1) == head_dim and k.stride(-1) == 1 and k.stride(1) == head_dim
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(num_tokens, num_kv_heads, head_dim, dtype=k.dtype, device=k.device)
    if not num_tokens:
        return q_out, k_out
    weights_and_eps = [m.weight for m in norms] + [m.eps for m in norms] if norms else [q, k, 0.0, 0.0]  # unread
    _rotary_kernel[(num_tokens,)](
        q, k, q.stride(0), k.stride(0), q_out, k_out, positions, cos_sin_cache, *weights_and_eps,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2, BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads), BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        NORM=norms is not None)
    return q_out, k_out

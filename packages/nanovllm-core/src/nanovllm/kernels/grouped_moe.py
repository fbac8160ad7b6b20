"""Mixture-of-experts in two grouped matmuls (Triton): the (token, expert) pairs are sorted by expert
and padded to whole tiles, so every tile multiplies rows of one expert. No host sync: CUDA-graph safe."""
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_matmul_kernel(a_ptr, w_ptr, out_ptr, scale_ptr, pair_ids_ptr, block_experts_ptr, num_pairs, N, K,
                           stride_a, stride_we, stride_wn, stride_out, A_ROW_DIV: tl.constexpr,
                           SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block)
    if expert >= 0:
        pairs = tl.load(pair_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs < num_pairs
        rows = pairs // A_ROW_DIV  # x is indexed by token (pair // top_k), the intermediate by pair
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows[:, None] * stride_a + offs_k[None, :],
                        mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)
            w = tl.load(w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None],
                        mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)
            acc = tl.dot(a, w, acc)
        if SCALE:
            acc = acc * tl.load(scale_ptr + pairs, mask=valid, other=0.0)[:, None]
        tl.store(out_ptr + pairs[:, None] * stride_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_n[None, :] < N))


def sort_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair ids grouped by expert, each group padded with ``num_pairs`` to whole ``block_m`` tiles; the expert
    of each tile, -1 past the end). Pairs whose id is ``num_experts`` get no tile (skipped). Sizes are the
    worst case, so nothing waits for the device."""
    flat = topk_ids.flatten()
    num_pairs = flat.numel()
    # (bincount would read its output size from the device: no CUDA graph could capture it)
    counts = (flat[:, None] == torch.arange(num_experts, device=flat.device)).sum(0)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    order = flat.argsort(stable=True)  # skipped pairs sort last
    sorted_experts = flat[order]
    expert = sorted_experts.clamp(max=num_experts - 1)
    rank = torch.arange(num_pairs, device=flat.device) - (counts.cumsum(0) - counts)[expert]
    max_tiles = (num_pairs + num_experts * (block_m - 1)) // block_m + 1
    dump = max_tiles * block_m  # skipped pairs are written past the end, then cut off
    pair_ids = torch.full((dump + 1,), num_pairs, dtype=torch.int64, device=flat.device)
    pair_ids[((padded_ends - padded)[expert] + rank).masked_fill(sorted_experts >= num_experts, dump)] = order
    tile_starts = torch.arange(max_tiles, device=flat.device) * block_m
    block_experts = torch.searchsorted(padded_ends, tile_starts, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1).to(torch.int32)
    return pair_ids[:dump], block_experts


def block_m_for(num_pairs: int) -> int:
    """Rows per tile: few for decode (few pairs per expert), many for prefill to reuse each weight tile."""
    return 16 if num_pairs <= 256 else 128


@functools.cache
def _shared_memory(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def tile_config(block_m: int, n: int, k: int, device: torch.device) -> dict:
    """Tiles, warps and pipeline stages, the best of tools/tune_grouped_moe.py on an H200: decode streams the
    weights in long K tiles (3.3-4.3 TB/s), prefill uses square tiles (340-530 TFLOP/s). K tiles and stages
    shrink to fit smaller GPUs' shared memory (sm86: 100 KiB, sm75: 64 KiB)."""
    block_n, block_k, warps = (64, 256, 4) if block_m <= 16 else (128, 64, 8)
    block_n = min(block_n, max(16, triton.next_power_of_2(n)))
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    if device.type != "cuda":  # Triton's CPU interpreter: warps and stages do not apply
        return dict(BLOCK_N=block_n, BLOCK_K=block_k)
    shared = _shared_memory(device.index if device.index is not None else torch.cuda.current_device())
    while block_k > 32 and 2 * (block_m + block_n) * block_k * 2 > shared:
        block_k //= 2
    stages = max(1, min(3, shared // ((block_m + block_n) * block_k * 2)))
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


def _grouped_matmul(a, w, out, scale, pair_ids, block_experts, num_pairs, a_row_div, block_m, config=None):
    n, k = w.shape[1], w.shape[2]
    config = config or tile_config(block_m, n, k, a.device)
    grid = (block_experts.numel(), triton.cdiv(n, config["BLOCK_N"]))
    _grouped_matmul_kernel[grid](a, w, out, scale if scale is not None else out, pair_ids, block_experts, num_pairs, n,
                                 k, a.stride(0), w.stride(0), w.stride(1), out.stride(0), A_ROW_DIV=a_row_div,
                                 SCALE=scale is not None, BLOCK_M=block_m, **config)


def grouped_moe_pairs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, out: torch.Tensor):
    """Write weight * down_e(silu(gate_e(x)) * up_e(x)) into row ``t * top_k + j`` of ``out`` for each pair
    (token t, e = topk_ids[t, j]) with e < E; rows of pairs whose id is E are left as they are.

    x: [tokens, H]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I]; out: [tokens * top_k, H].
    """
    from nanovllm.layers.activation import silu_and_mul
    num_pairs, top_k = topk_ids.numel(), topk_ids.size(1)
    block_m = block_m_for(num_pairs)
    pair_ids, block_experts = sort_pairs_by_expert(topk_ids, w13.shape[0], block_m)
    gate_up = torch.empty(num_pairs, w13.shape[1], dtype=x.dtype, device=x.device)
    _grouped_matmul(x, w13, gate_up, None, pair_ids, block_experts, num_pairs, top_k, block_m)
    hidden = silu_and_mul(gate_up)
    _grouped_matmul(hidden, w2, out, topk_weights.flatten().float().contiguous(), pair_ids, block_experts, num_pairs, 1,
                    block_m)


def grouped_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_j weight_j * down_e(silu(gate_e(x)) * up_e(x)) over each token's experts e = topk_ids[:, j]: [tokens, H]."""
    tokens, top_k = topk_ids.shape
    out = torch.empty(tokens * top_k, w2.shape[1], dtype=x.dtype, device=x.device)
    grouped_moe_pairs(x, w13, w2, topk_weights, topk_ids, out)
    return out.view(tokens, top_k, -1).sum(dim=1)

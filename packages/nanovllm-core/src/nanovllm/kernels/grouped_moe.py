"""Mixture-of-experts in two grouped matmuls (Triton): the (token, expert) pairs are sorted by expert
and padded to whole tiles, so every tile multiplies rows of one expert. No host sync: CUDA-graph safe."""
import torch
import triton
import triton.language as tl

from nanovllm.kernels import multiprocessors, shared_memory
from nanovllm.layers.activation import silu_and_mul
from nanovllm.layers.compile import compile_on_cuda

# One Triton program sorts the pairs while its [pairs or tiles, experts] tables stay this small (decode steps of
# Mixtral or Qwen2-MoE); larger steps, and Qwen3-MoE's 128 experts, go through torch
SORT_IN_ONE_PROGRAM = 8192


@triton.jit
def _grouped_matmul_kernel(a_ptr, w_ptr, out_ptr, scale_ptr, pair_ids_ptr, block_experts_ptr, num_pairs, N, K,
                           stride_a, stride_we, stride_wn, stride_out, A_ROW_DIV: tl.constexpr,
                           SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           SPLIT_K: tl.constexpr = 1):
    """Each split of K writes its own row, pair * SPLIT_K + split: the caller sums them."""
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block)
    if expert >= 0:
        pairs = tl.load(pair_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs < num_pairs
        rows = pairs // A_ROW_DIV  # x is indexed by token (pair // top_k), the intermediate by pair
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_chunk = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
        k_start = tl.program_id(2) * k_chunk
        for start in range(k_start, tl.minimum(k_start + k_chunk, K), BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows[:, None] * stride_a + offs_k[None, :],
                        mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)
            w = tl.load(w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None],
                        mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)
            acc = tl.dot(a, w, acc)
        if SCALE:
            acc = acc * tl.load(scale_ptr + pairs, mask=valid, other=0.0)[:, None]
        out_rows = pairs * SPLIT_K + tl.program_id(2)
        tl.store(out_ptr + out_rows[:, None] * stride_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_n[None, :] < N))


@triton.jit
def _sort_pairs_kernel(ids_ptr, pair_ids_ptr, block_experts_ptr, num_pairs, num_experts, max_tiles,
                       PAIRS: tl.constexpr, EXPERTS: tl.constexpr, TILES: tl.constexpr, BLOCK_M: tl.constexpr,
                       FILL: tl.constexpr = 1024):
    """sort_pairs_by_expert in one program: for decode-sized steps one launch instead of some twenty."""
    pairs = tl.arange(0, PAIRS)
    experts = tl.arange(0, EXPERTS)
    ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=num_experts)
    match = ((ids[:, None] == experts[None, :]) & (experts[None, :] < num_experts)).to(tl.int32)  # [PAIRS, EXPERTS]
    counts = tl.sum(match, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_ends = tl.cumsum(padded, axis=0)
    rank = tl.sum(match * (tl.cumsum(match, axis=0) - 1), axis=1)  # earlier pairs of the same expert
    start = tl.sum(match * (padded_ends - padded)[None, :], axis=1)
    for offset in range(0, max_tiles * BLOCK_M, FILL):
        slots = offset + tl.arange(0, FILL)
        tl.store(pair_ids_ptr + slots, num_pairs, mask=slots < max_tiles * BLOCK_M)
    tl.debug_barrier()  # the padding is written before the pairs land on it
    tl.store(pair_ids_ptr + start + rank, pairs, mask=ids < num_experts)
    tiles = tl.arange(0, TILES)
    done = tl.sum(((padded_ends[None, :] <= tiles[:, None] * BLOCK_M) & (experts[None, :] < num_experts))
                  .to(tl.int32), axis=1)  # experts whose tiles all start before this one
    tl.store(block_experts_ptr + tiles, tl.where(done < num_experts, done, -1), mask=tiles < max_tiles)


def sort_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair ids grouped by expert, each group padded with ``num_pairs`` to whole ``block_m`` tiles; the expert
    of each tile, -1 past the end). Pairs whose id is ``num_experts`` get no tile (skipped). Sizes are the
    worst case, so nothing waits for the device."""
    num_pairs = topk_ids.numel()
    table = max(num_pairs, _max_tiles(num_pairs, num_experts, block_m))
    small = triton.next_power_of_2(table) * triton.next_power_of_2(num_experts) <= SORT_IN_ONE_PROGRAM
    sort = _sort_pairs_in_one_program if small else _sort_pairs_with_torch
    return sort(topk_ids.flatten().contiguous(), num_experts, block_m)


def _max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    return (num_pairs + num_experts * (block_m - 1)) // block_m + 1


def _sort_pairs_in_one_program(flat: torch.Tensor, num_experts: int, block_m: int):
    num_pairs, max_tiles = flat.numel(), _max_tiles(flat.numel(), num_experts, block_m)
    pair_ids = torch.empty(max_tiles * block_m, dtype=torch.int64, device=flat.device)
    block_experts = torch.empty(max_tiles, dtype=torch.int32, device=flat.device)
    _sort_pairs_kernel[(1,)](flat, pair_ids, block_experts, num_pairs, num_experts, max_tiles,
                             PAIRS=triton.next_power_of_2(num_pairs), EXPERTS=triton.next_power_of_2(num_experts),
                             TILES=triton.next_power_of_2(max_tiles), BLOCK_M=block_m)
    return pair_ids, block_experts


def _sort_pairs_with_torch(flat: torch.Tensor, num_experts: int, block_m: int):
    num_pairs, max_tiles = flat.numel(), _max_tiles(flat.numel(), num_experts, block_m)
    # (bincount would read its output size from the device: no CUDA graph could capture it)
    counts = (flat[:, None] == torch.arange(num_experts, device=flat.device)).sum(0)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    order = flat.argsort(stable=True)  # skipped pairs sort last
    sorted_experts = flat[order]
    expert = sorted_experts.clamp(max=num_experts - 1)
    rank = torch.arange(num_pairs, device=flat.device) - (counts.cumsum(0) - counts)[expert]
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


def tile_config(block_m: int, n: int, k: int, device: torch.device) -> dict:
    """Tiles, warps and pipeline stages, the best of tools/tune_grouped_moe.py on an H200: decode streams the
    weights in long K tiles (3.5-4.4 TB/s), prefill uses square tiles (330-550 TFLOP/s). K tiles
    and stages shrink to fit smaller GPUs' shared memory (sm86: 100 KiB, sm75: 64 KiB)."""
    block_n, block_k, warps = (64, 256, 4) if block_m <= 16 else (128, 64, 8)
    block_n = min(block_n, max(16, triton.next_power_of_2(n)))
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    if device.type != "cuda":  # Triton's CPU interpreter: warps and stages do not apply
        return dict(BLOCK_N=block_n, BLOCK_K=block_k)
    shared = shared_memory(device)
    while block_k > 32 and 2 * (block_m + block_n) * block_k * 2 > shared:
        block_k //= 2
    stages = max(1, min(3, shared // ((block_m + block_n) * block_k * 2)))
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


def split_k_for(num_pairs: int, num_experts: int, w: torch.Tensor) -> int:
    """Splits of K for a grouped matmul over ``w`` [E, N, K]. A decode step may have too few output tiles to
    keep every SM streaming (batch 1 of Mixtral: 128 tiles for the down matmul's two experts, 16 for a low-rank
    factor's), so K is split until some four tiles per SM run; each split gets whole K tiles, none empty.
    Measured by tools/tune_grouped_moe.py and tools/bench_moe_svd.py --profile."""
    if not w.is_cuda:
        return 1
    n, k = w.shape[1], w.shape[2]
    block_m = block_m_for(num_pairs)
    config = tile_config(block_m, n, k, w.device)
    m_tiles = min(num_experts, num_pairs) + num_pairs // block_m  # one per expert in use, more as pairs grow
    wanted = max(1, 4 * multiprocessors(w.device) // (m_tiles * triton.cdiv(n, config["BLOCK_N"])))
    k_tiles = triton.cdiv(k, config["BLOCK_K"])
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, wanted))


def grouped_matmul(a, w, out, scale, pair_ids, block_experts, num_pairs, a_row_div, block_m, config=None, split_k=1):
    """``out[p] = scale[p] * a[p // a_row_div] @ w[e].T`` for each pair p of expert e, with the pairs grouped by
    ``sort_pairs_by_expert(topk_ids, E, block_m)``; ``w``: [E, N, K]; ``scale`` None for none; with ``split_k``
    > 1, row p * split_k + s of ``out`` holds split s of K. Expert managers may build on it (no host sync)."""
    n, k = w.shape[1], w.shape[2]
    config = config or tile_config(block_m, n, k, a.device)
    grid = (block_experts.numel(), triton.cdiv(n, config["BLOCK_N"]), split_k)
    _grouped_matmul_kernel[grid](a, w, out, scale if scale is not None else out, pair_ids, block_experts, num_pairs, n,
                                 k, a.stride(0), w.stride(0), w.stride(1), out.stride(0), A_ROW_DIV=a_row_div,
                                 SCALE=scale is not None, BLOCK_M=block_m, SPLIT_K=split_k, **config)


@compile_on_cuda
def _sum_rows(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return out.sum(dim=1).to(dtype)


def grouped_moe_pairs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, out: torch.Tensor):
    """Write weight * down_e(silu(gate_e(x)) * up_e(x)) into row ``t * top_k + j`` of ``out`` for each pair
    (token t, e = topk_ids[t, j]) with e < E; rows of pairs whose id is E are left as they are.

    x: [tokens, H]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I]; out: [tokens * top_k, H], or
    [tokens * top_k * S, H] for the down matmul's K in S splits: row p * S + s holds split s of pair p.
    """
    num_pairs, top_k = topk_ids.numel(), topk_ids.size(1)
    block_m = block_m_for(num_pairs)
    pair_ids, block_experts = sort_pairs_by_expert(topk_ids, w13.shape[0], block_m)
    gate_up = torch.empty(num_pairs, w13.shape[1], dtype=x.dtype, device=x.device)
    grouped_matmul(x, w13, gate_up, None, pair_ids, block_experts, num_pairs, top_k, block_m)
    hidden = silu_and_mul(gate_up)
    grouped_matmul(hidden, w2, out, topk_weights.flatten().float().contiguous(), pair_ids, block_experts, num_pairs, 1,
                    block_m, split_k=out.shape[0] // num_pairs)


def pair_rows(topk_ids: torch.Tensor, num_experts: int, w2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty ``out`` for grouped_moe_pairs: a row per pair in ``dtype``, or, when the down matmul splits K
    (small batches), a float32 row per pair and split."""
    split = split_k_for(topk_ids.numel(), num_experts, w2)
    return torch.empty(topk_ids.numel() * split, w2.shape[1], dtype=torch.float32 if split > 1 else dtype,
                       device=w2.device)


def sum_pair_rows(out: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Each token's sum of its rows in ``out`` (all its pairs and splits): [tokens, H] in ``dtype``."""
    return _sum_rows(out.view(tokens, -1, out.shape[-1]), dtype)


def grouped_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_j weight_j * down_e(silu(gate_e(x)) * up_e(x)) over each token's experts e = topk_ids[:, j]: [tokens, H]."""
    out = pair_rows(topk_ids, w13.shape[0], w2, x.dtype)
    grouped_moe_pairs(x, w13, w2, topk_weights, topk_ids, out)
    return sum_pair_rows(out, x.shape[0], x.dtype)

"""y = x W^T (+ b) for the few rows of a decode step, in Triton. There the matmul is a read of the weight, which
cuBLAS's kernels did at 1.3 of an H100's 3.35 TB/s in a decode step's profile (benchmarks/RESULTS.md);
tools/bench_linear.py measures this kernel beside them. Each program takes BLOCK_N output features for every row,
over one of SPLIT_K parts of the inputs; the last part of a BLOCK_N to finish adds the parts' fp32 sums, so a split
costs no second kernel. Only fp16/bf16 tensor-core dots and fp32 sums: Turing (sm75) runs it too."""
import torch
import triton
import triton.language as tl

from nanovllm.kernels import arrival_counts, multiprocessors, shared_memory


@triton.jit
def _linear_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, partial_ptr, arrived_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    part = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(split * part, tl.minimum(K, (split + 1) * part), BLOCK_K):
        k_mask = (k + offs_k) < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k + offs_k)[None, :],
                    mask=(offs_m[:, None] < M) & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k + offs_k)[None, :],
                    mask=(offs_n[:, None] < N) & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    last = True
    if SPLIT_K > 1:
        tile = offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial_ptr + split * M * N + tile, acc, mask=mask)
        tl.debug_barrier()  # every thread's sums are stored before the count below releases them
        last = tl.atomic_add(arrived_ptr + pid_n, 1, sem="acq_rel") == SPLIT_K - 1
        if last:  # L1 is not coherent across SMs: other programs' sums are read from L2
            for other in range(SPLIT_K):
                if other != split:
                    acc += tl.load(partial_ptr + other * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(arrived_ptr + pid_n, 0)  # zero again for the next call
    if last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


MAX_ROWS = 64  # one tile of rows; more rows than a decode step's few make the matmul more than a weight read


def tiles(m: int, n: int, k: int, device: torch.device) -> dict:
    """Tiles for an [m, k] x [k, n] matmul: BLOCK_N output features a program, and K split until every SM has a
    program reading its slice of the weight; pipeline stages as many as fit in shared memory beside the output tile,
    up to 4. On CPU (Triton's interpreter) as for 16 SMs, so that the tests see several splits and empty ones."""
    block_m, block_n, block_k = max(16, triton.next_power_of_2(m)), 32, 128
    sms = multiprocessors(device) if device.type == "cuda" else 16
    split_k = 1
    while triton.cdiv(n, block_n) * split_k < sms and k // (2 * split_k) >= 256:
        split_k *= 2
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k)
    if device.type == "cuda":  # Triton's CPU interpreter: stages do not apply
        room = shared_memory(device) - block_m * block_n * 4
        config["num_stages"] = max(1, min(4, room // ((block_m + block_n) * block_k * 2)))
    return config


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, k] (m at most MAX_ROWS) times weight [n, k]^T, plus bias [n]; x's rows and the weight's contiguous."""
    (m, k), n = x.shape, weight.shape[0]
    if m > MAX_ROWS or x.stride(1) != 1 or weight.stride(1) != 1 or weight.numel() >= 2 ** 31:
        raise ValueError(f"linear takes at most {MAX_ROWS} rows, each contiguous, and a contiguous weight of under "
                         f"2^31 elements (its offsets are int32); got x {tuple(x.shape)} with strides {x.stride()} "
                         f"and weight {tuple(weight.shape)} with strides {weight.stride()}: use F.linear")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    config = tiles(m, n, k, x.device)
    partial, arrived = y, y
    if config["SPLIT_K"] > 1:
        partial = torch.empty(config["SPLIT_K"], m, n, device=x.device, dtype=torch.float32)
        arrived = arrival_counts(triton.cdiv(n, config["BLOCK_N"]), x.device)
    _linear_kernel[(triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])](
        x, weight, bias if bias is not None else y, y, partial, arrived, m, n, k, x.stride(0), weight.stride(0),
        y.stride(0), HAS_BIAS=bias is not None, **config)
    return y

"""One Triton kernel for the gate and up bases and SiLU-and-multiply at decode: ``silu(t_gate @ U_gate.T) * (t_up @
U_up.T)``. Three launches become one, and neither [pairs, I] product is written out: at decode a layer's bases are a
few microseconds of reading, so the launches and round trips were much of their cost. Larger steps keep cuBLAS."""
import torch
import triton
import triton.language as tl

from nanovllm.layers.activation import silu_and_mul


@triton.jit
def _gate_up_silu_kernel(t_ptr, u_gate_ptr, u_up_ptr, out_ptr, M, N, R, stride_t, stride_u, stride_out,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, R, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        t_mask = (rows[:, None] < M) & (offs_k[None, :] < R)
        u_mask = (cols[None, :] < N) & (offs_k[:, None] < R)
        t_rows = t_ptr + rows[:, None] * stride_t + offs_k[None, :]
        u_cols = cols[None, :] * stride_u + offs_k[:, None]
        gate = tl.dot(tl.load(t_rows, mask=t_mask, other=0.0), tl.load(u_gate_ptr + u_cols, mask=u_mask, other=0.0),
                      gate)
        up = tl.dot(tl.load(t_rows + R, mask=t_mask, other=0.0), tl.load(u_up_ptr + u_cols, mask=u_mask, other=0.0),
                    up)
    dtype = out_ptr.dtype.element_ty
    g = gate.to(dtype).to(tl.float32)  # rounded where the two matmuls' outputs and silu_and_mul round
    silu = (g / (1.0 + tl.exp(-g))).to(dtype)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], silu * up.to(dtype),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


# Pairs (rows) up to which the kernel runs; above, cuBLAS's two matmuls and silu_and_mul are faster. On an H100, rank
# 256, each call in a CUDA graph: 2 rows 13.5 against 17.1 us, 32 rows 13.7 against 19.3 us, 256 rows 30.8 (its best
# tiles) against 24.9 us (benchmarks/RESULTS.md).
FUSED_ROWS = 32


def tile_config(r: int, device: torch.device) -> dict:
    """Narrow column tiles over the rank in two steps, so some 450 programs each stream their slice of both bases (the
    best of a sweep on an H100 at 2 and 32 rows; 48 KiB of shared memory at most, within every GPU's)."""
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=min(128, max(16, triton.next_power_of_2(r))))
    if device.type == "cuda":  # Triton's CPU interpreter takes no warps or stages
        config.update(num_warps=4, num_stages=2)
    return config


def gate_up_silu(t: torch.Tensor, u_gate: torch.Tensor, u_up: torch.Tensor) -> torch.Tensor:
    """t: [M, 2r] holding [t_gate, t_up]; u_gate, u_up: [N, r] contiguous. Returns silu(t_gate @ u_gate.T) *
    (t_up @ u_up.T): [M, N] in t's dtype."""
    m, r, n = t.shape[0], u_gate.shape[1], u_gate.shape[0]
    assert t.shape[1] == 2 * r and t.stride(1) == 1 and u_gate.stride() == u_up.stride() == (r, 1)
    if m > FUSED_ROWS:
        gate_up = torch.empty(m, 2 * n, dtype=t.dtype, device=t.device)
        torch.mm(t[:, :r], u_gate.t(), out=gate_up[:, :n])
        torch.mm(t[:, r:], u_up.t(), out=gate_up[:, n:])
        return silu_and_mul(gate_up)
    out = torch.empty(m, n, dtype=t.dtype, device=t.device)
    config = tile_config(r, t.device)
    grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]))
    _gate_up_silu_kernel[grid](t, u_gate, u_up, out, m, n, r, t.stride(0), u_gate.stride(0), out.stride(0), **config)
    return out

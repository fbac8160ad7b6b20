"""The linear layers of a decode step: cuBLAS (F.linear, what the engine runs) against a candidate Triton kernel
that gives every SM a slice of the weight, to see whether the weights of a step can be read nearer the HBM bound.

    python tools/bench_linear.py [--shape qwen3-0.6b|qwen3-8b] [--rows 8 64 128]

A decode step reads every weight once; at a few rows that read is the whole cost. The candidate computes
y = x W^T with one program per BLOCK_N output features (times SPLIT_K parts of the inputs, whose fp32 partial sums
a torch sum adds up, as cuBLAS's split-K reduction does), all rows of x in one tile. For each layer shape of the
model and row count it tries a few tile configurations and prints cuBLAS's time and the best candidate's, each as
a CUDA graph replay, with the bandwidth of the weight bytes and the candidate's largest difference from cuBLAS;
then the sum over the model's layers (per decode step, LM head aside).
"""
import argparse
import itertools

import torch
import triton
import triton.language as tl
from bench_paged_attention import in_graph
from triton.testing import do_bench


@triton.jit
def _linear_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ys, stride_ym, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Rows 0..M of y[split] = x W^T over part ``split`` of the K inputs, for BLOCK_N output features."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    part = K // SPLIT_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(split * part, (split + 1) * part, BLOCK_K):
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k + offs_k)[None, :], mask=offs_m[:, None] < M, other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k + offs_k)[None, :], mask=offs_n[:, None] < N, other=0.0)
        acc += tl.dot(x, tl.trans(w))
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + split * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask)


def linear(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, split_k: int, stages: int) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T with the candidate kernel (K a multiple of split_k * block_k)."""
    (m, k), n = x.shape, w.shape[0]
    out = torch.empty(split_k, m, n, device=x.device, dtype=x.dtype if split_k == 1 else torch.float32)
    _linear_kernel[(triton.cdiv(n, block_n), split_k)](
        x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0), out.stride(1),
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        num_warps=4, num_stages=stages)
    return out[0] if split_k == 1 else out.sum(0).to(x.dtype)


def layer_shapes(shape: str) -> tuple[dict[str, tuple[int, int]], dict]:
    """(output features, input features) of each linear layer of one decoder layer, and the model's config."""
    from nanovllm.testing import QWEN3_0_6B, QWEN3_8B
    c = {"qwen3-0.6b": QWEN3_0_6B, "qwen3-8b": QWEN3_8B}[shape]
    hidden, q_size = c["hidden_size"], c["num_attention_heads"] * c["head_dim"]
    return {"qkv": (q_size + 2 * c["num_key_value_heads"] * c["head_dim"], hidden), "o": (hidden, q_size),
            "gate_up": (2 * c["intermediate_size"], hidden), "down": (hidden, c["intermediate_size"])}, c


CONFIGS = [dict(block_n=n, block_k=k, split_k=s, stages=st)
           for n, k, s, st in itertools.product((16, 32, 64), (64, 128), (1, 2), (4,))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("qwen3-0.6b", "qwen3-8b"), default="qwen3-0.6b")
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 64, 128])
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes, config = layer_shapes(args.shape)
    print(torch.cuda.get_device_name(), args.shape)
    totals = {rows: [0.0, 0.0] for rows in args.rows}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            reference = torch.nn.functional.linear(x, w)
            cublas = do_bench(in_graph(lambda: torch.nn.functional.linear(x, w)), warmup=5, rep=25) * 1e3
            best = None
            for cfg in CONFIGS:
                if k % (cfg["block_k"] * cfg["split_k"]):
                    continue
                try:
                    error = (linear(x, w, **cfg).float() - reference.float()).abs().max().item()
                    us = do_bench(in_graph(lambda cfg=cfg: linear(x, w, **cfg)), warmup=5, rep=25) * 1e3
                except triton.runtime.errors.OutOfResources:
                    continue  # the tiles do not fit in shared memory
                if best is None or us < best[0]:
                    best = (us, cfg, error)
            gb = n * k * 2 / 1e9
            totals[rows][0] += cublas * config["num_hidden_layers"]
            totals[rows][1] += best[0] * config["num_hidden_layers"]
            print(f"{name:>8} {n}x{k}, {rows:>3} rows: cuBLAS {cublas:6.1f} us {gb / cublas * 1e6:5.0f} GB/s; "
                  f"candidate {best[0]:6.1f} us {gb / best[0] * 1e6:5.0f} GB/s {best[1]} (diff {best[2]:.4f})",
                  flush=True)
    for rows, (cublas, candidate) in totals.items():
        print(f"{config['num_hidden_layers']} layers, {rows} rows: cuBLAS {cublas:.0f} us, "
              f"candidate {candidate:.0f} us ({cublas / candidate:.2f}x)")


if __name__ == "__main__":
    main()

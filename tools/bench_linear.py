"""The linear layers of a decode step: cuBLAS (F.linear) against the engine's Triton kernel for few rows
(nanovllm.kernels.linear), in its default tiles (``tiles``) and in every tile configuration of a sweep.

    python tools/bench_linear.py [--shape qwen3-0.6b qwen3-8b mixtral] [--rows 1 16 64 256] [--json FILE]

A decode step reads every weight once; at a few rows that read is the whole cost. Each figure is one CUDA graph
that runs the layer's matmul once per decoder layer, each with its own weight (as a step does: no weight is still
in L2 from the call before), divided by the layers: kernel time and the gaps between kernels, as in the engine's
graphs. For each layer shape and row count it prints cuBLAS's time, the kernel's in its default tiles (up to
MAX_ROWS rows) and in the best of the sweep (with the bandwidth of the weight bytes and its largest difference from
cuBLAS); then the sums over the model's layers per decode step (LM head aside). --json keeps every configuration's
time.
"""
import argparse
import itertools
import json

import torch
import triton
from bench_paged_attention import in_graph
from nanovllm.kernels import arrival_counts
from nanovllm.kernels.linear import _linear_kernel
from nanovllm.kernels.linear import MAX_ROWS
from nanovllm.kernels.linear import linear as default_linear
from triton.testing import do_bench


def linear(x: torch.Tensor, w: torch.Tensor, block_n: int, split_k: int, block_k: int = 128, stages: int = 4,
           warps: int = 4) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T with the kernel in one tile configuration."""
    (m, k), n = x.shape, w.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    partial = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32) if split_k > 1 else y
    _linear_kernel[(triton.cdiv(n, block_n), split_k)](
        x, w, y, y, partial, arrival_counts(triton.cdiv(n, block_n), x.device), m, n, k, x.stride(0), w.stride(0),
        y.stride(0), HAS_BIAS=False, BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT_K=split_k, num_warps=warps, num_stages=stages)
    return y


def layer_shapes(shape: str) -> tuple[dict[str, tuple[int, int]], int]:
    """(output features, input features) of each linear layer of one decoder layer, and the number of layers."""
    from nanovllm.testing import QWEN3_0_6B, QWEN3_8B
    if shape == "mixtral":  # attention projections of Mixtral 8x7B (its experts are the MoE benchmarks')
        return {"qkv": (4096 + 2 * 1024, 4096), "o": (4096, 4096)}, 32
    c = {"qwen3-0.6b": QWEN3_0_6B, "qwen3-8b": QWEN3_8B}[shape]
    hidden, q_size = c["hidden_size"], c["num_attention_heads"] * c["head_dim"]
    return {"qkv": (q_size + 2 * c["num_key_value_heads"] * c["head_dim"], hidden), "o": (hidden, q_size),
            "gate_up": (2 * c["intermediate_size"], hidden), "down": (hidden, c["intermediate_size"])
            }, c["num_hidden_layers"]


def configs(rows: int) -> list[dict]:
    """Tile configurations to try at this many rows."""
    found = [dict(block_n=n, split_k=s, block_k=k, stages=4) for n, s, k in
             itertools.product((16, 32, 64), (1, 2, 4, 8), (128, 256))]
    if rows >= 128:
        found += [dict(block_n=n, split_k=s, block_k=64, stages=3, warps=8) for n, s in
                  itertools.product((32, 64, 128), (1, 2, 4))]
    return found


def per_layer_us(run, x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """Microseconds per call of ``run(x, w)`` in one CUDA graph over every weight."""
    replay = in_graph(lambda: [run(x, w) for w in weights])
    return do_bench(replay, warmup=5, rep=50) * 1e3 / len(weights)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", choices=("qwen3-0.6b", "qwen3-8b", "mixtral"),
                        default=["qwen3-0.6b", "qwen3-8b"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--json", help="write every configuration's time here")
    args = parser.parse_args()
    records = []
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    for shape in args.shape:
        shapes, num_layers = layer_shapes(shape)
        totals = {rows: [0.0, 0.0, 0.0] for rows in args.rows}
        print(f"{shape}, {num_layers} layers")
        for name, (n, k) in shapes.items():
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(num_layers)]
            for rows in args.rows:
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                reference = torch.nn.functional.linear(x, weights[0])
                cublas = per_layer_us(torch.nn.functional.linear, x, weights)
                default = per_layer_us(default_linear, x, weights) if rows <= MAX_ROWS else None
                record = dict(shape=shape, layer=name, n=n, k=k, rows=rows, cublas=cublas, default=default, configs=[])
                records.append(record)
                best = None
                for cfg in configs(rows):
                    try:
                        error = (linear(x, weights[0], **cfg).float() - reference.float()).abs().max().item()
                        us = per_layer_us(lambda x, w, cfg=cfg: linear(x, w, **cfg), x, weights)
                    except triton.runtime.errors.OutOfResources:
                        continue  # the tiles do not fit in shared memory or registers
                    record["configs"].append((cfg, us))
                    if best is None or us < best[0]:
                        best = (us, cfg, error)
                gb = n * k * 2 / 1e9
                totals[rows][0] += cublas * num_layers
                totals[rows][1] += best[0] * num_layers
                totals[rows][2] += (default or 0) * num_layers
                shown = f"{default:6.1f} us" if default else "-"
                print(f"{name:>8} {n}x{k}, {rows:>3} rows: cuBLAS {cublas:6.1f} us {gb / cublas * 1e6:5.0f} GB/s; "
                      f"default tiles {shown}; best {best[0]:6.1f} us {gb / best[0] * 1e6:5.0f} GB/s {best[1]} "
                      f"(diff {best[2]:.4f})", flush=True)
            del weights
        for rows, (cublas, best, default) in totals.items():
            shown = f"{default:.0f} us" if default else "-"
            print(f"{shape}, {num_layers} layers, {rows} rows: cuBLAS {cublas:.0f} us, default tiles {shown}, "
                  f"best of the sweep {best:.0f} us ({cublas / best:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f)


if __name__ == "__main__":
    main()

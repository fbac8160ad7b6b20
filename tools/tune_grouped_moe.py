"""Sweep the grouped MoE kernel's tiles at Mixtral-8x7B's expert shape and print the best against the default.

    python tools/tune_grouped_moe.py

For each token count (decode 1..64, prefill 512 and 2048; top 2 of 8 experts, bf16) and each of the two
grouped matmuls (gate+up: [pairs x 4096] @ [4096 x 28672]; down: [pairs x 14336] @ [14336 x 4096]):
the default from ``tile_config`` (and ``split_k_for``), then the four fastest candidates, as weight bytes per
second (the bound for decode) and FLOP/s (the bound for prefill). Decode's down matmul also tries K in 1, 2, 4
or 8 splits (each split writes its own fp32 rows; their sum, one small kernel more, is not timed). Each
candidate's output must match the default's.
"""
import itertools

import torch
from triton.testing import do_bench

from bench_moe import E, H, I, MIXTRAL_8X7B
from nanovllm.kernels import grouped_moe as g

TOP_K = MIXTRAL_8X7B["num_experts_per_tok"]
# (block_m, block_n, block_k, warps, stages, splits of K)
DECODE = [(16, bn, bk, 4, s, 1) for bn, bk, s in itertools.product((32, 64, 128), (128, 256), (3, 4, 5))]
DECODE_DOWN = [(16, bn, bk, 4, s, k) for bn, bk, s, k in itertools.product((32, 64, 128), (128, 256), (3, 4),
                                                                           (1, 2, 4, 8))]
PREFILL = [(bm, bn, bk, w, 3, 1) for bm, bn, bk, w in itertools.product((16, 64, 128), (64, 128), (64, 128), (4, 8))]


def main():
    torch.manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02
    print(torch.cuda.get_device_name())
    for tokens in (1, 4, 16, 64, 512, 2048):
        ids = torch.stack([torch.randperm(E, device="cuda")[:TOP_K] for _ in range(tokens)])
        pairs = tokens * TOP_K
        active = ids.unique().numel()
        x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
        hidden = torch.randn(pairs, I, device="cuda", dtype=torch.bfloat16)
        scale = torch.rand(pairs, device="cuda")
        sorted_for = {bm: g.sort_pairs_by_expert(ids, E, bm) for bm in (16, 64, 128)}
        for name, a, w, scale_, row_div in (("gate+up", x, w13, None, TOP_K), ("down", hidden, w2, scale, 1)):
            weight_bytes, flop = active * w[0].numel() * 2, 2 * pairs * w[0].numel()

            def run(block_m, config, split):
                out = torch.empty(pairs * split, w.shape[1], device="cuda",
                                  dtype=torch.float32 if split > 1 else torch.bfloat16)
                ms = do_bench(lambda: g.grouped_matmul(a, w, out, scale_, *sorted_for[block_m], pairs, row_div,
                                                        block_m, config, split), warmup=5, rep=25)
                return ms, out.view(pairs, split, -1).float().sum(1)

            block_m = g.block_m_for(pairs)
            split = g.split_k_for(pairs, E, w2) if name == "down" else 1
            default_ms, reference = run(block_m, None, split)
            rows = []
            candidates = PREFILL if pairs > 256 else DECODE_DOWN if name == "down" else DECODE
            for bm, bn, bk, warps, stages, splits in candidates:
                try:
                    ms, out = run(bm, dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages), splits)
                except Exception:  # more shared memory than this GPU has
                    continue
                torch.testing.assert_close(out, reference, atol=1e-2, rtol=2e-2)
                rows.append((ms, (bm, bn, bk, warps, stages, splits)))

            def line(ms):
                return f"{weight_bytes / ms / 1e6:6.0f} GB/s {flop / ms / 1e9:5.0f} TFLOP/s {ms * 1e3:6.0f} us"
            print(f"tokens {tokens:4d} {name:7s} default {line(default_ms)}  (block_m {block_m}, "
                  f"{g.tile_config(block_m, w.shape[1], w.shape[2], a.device)}, splits {split})")
            for ms, candidate in sorted(rows)[:4]:
                print(f"{'':21s} {line(ms)}  (block_m, block_n, block_k, warps, stages, splits) = {candidate}")


if __name__ == "__main__":
    main()

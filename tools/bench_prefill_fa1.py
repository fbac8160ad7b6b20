"""Prefill attention: flash-attn 1 (flash_attn_unpadded_func) against torch SDPA, causal, fp16.

    PYTHONPATH=/tmp/fa1 python tools/bench_prefill_fa1.py [--batch 8] [--heads 16] [--head-dim 128]

For each sequence length (128, 256, 512, 1024) it times one causal attention over a batch of equal
sequences with both, on CUDA events (median of triton.testing.do_bench), and prints their ratio.
"""
import argparse
import json

import torch
import torch.nn.functional as F
import triton


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    from flash_attn.flash_attn_interface import flash_attn_unpadded_func
    import flash_attn
    rows = []
    for seq_len in (128, 256, 512, 1024):
        b, h, d = args.batch, args.heads, args.head_dim
        q, k, v = (torch.randn(b * seq_len, h, d, device="cuda", dtype=torch.float16) for _ in range(3))
        cu = torch.arange(0, (b + 1) * seq_len, seq_len, device="cuda", dtype=torch.int32)
        flash = triton.testing.do_bench(lambda: flash_attn_unpadded_func(q, k, v, cu, cu, seq_len, seq_len, 0.0,
                                                                          causal=True))
        qb, kb, vb = (x.view(b, seq_len, h, d).transpose(1, 2) for x in (q, k, v))
        sdpa = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True))
        error = (flash_attn_unpadded_func(q, k, v, cu, cu, seq_len, seq_len, 0.0, causal=True).view(b, seq_len, h, d)
                 - F.scaled_dot_product_attention(qb, kb, vb, is_causal=True).transpose(1, 2)).abs().max().item()
        rows.append(dict(seq_len=seq_len, flash_attn_1_ms=flash, sdpa_ms=sdpa, speedup=sdpa / flash, max_error=error))
    print(f"{torch.cuda.get_device_name(0)}, flash-attn {flash_attn.__version__}, torch {torch.__version__}, "
          f"batch {args.batch}, {args.heads} heads of {args.head_dim}, fp16, causal")
    print(f"{'seq_len':>8} {'flash-attn 1':>13} {'torch SDPA':>11} {'SDPA/fa1':>9} {'max err':>8}")
    for r in rows:
        print(f"{r['seq_len']:>8} {r['flash_attn_1_ms']:>10.3f} ms {r['sdpa_ms']:>8.3f} ms {r['speedup']:>8.2f}x "
              f"{r['max_error']:>8.4f}")
    print("SUMMARY " + json.dumps(rows))


if __name__ == "__main__":
    main()

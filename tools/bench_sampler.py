"""The sampler's common case (no top-k/top-p, no seeds) alone: the Triton kernel against the same Gumbel-max in
compiled PyTorch (the path it replaced), on a vocabulary of Qwen3's size.

    python tools/bench_sampler.py [--vocab 151936]

Times from triton.testing.do_bench (the sampler runs eagerly, after the model's graph); rows half greedy.
"""
import argparse

import torch
from triton.testing import do_bench

from nanovllm.kernels.sampling import gumbel_argmax
from nanovllm.layers.sampler import gumbel_argmax_torch


compiled_gumbel_argmax = torch.compile(gumbel_argmax_torch, dynamic=True)  # as the sampler ran before the kernel


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    args = parser.parse_args()
    print(torch.cuda.get_device_name())
    for rows in (1, 8, 23, 64, 128, 256, 512):
        logits = torch.randn(rows, args.vocab, device="cuda", dtype=torch.bfloat16)
        temperatures = torch.tensor([0.0, 0.6] * (rows // 2) + [0.6] * (rows % 2), device="cuda")
        assert torch.equal(gumbel_argmax(logits, temperatures)[temperatures == 0],
                           compiled_gumbel_argmax(logits, temperatures)[temperatures == 0])
        line = f"{rows:4d} rows:"
        for name, fn in (("compiled PyTorch", compiled_gumbel_argmax), ("Triton kernel", gumbel_argmax)):
            us = do_bench(lambda: fn(logits, temperatures)) * 1e3
            line += f"  {name} {us:7.1f} us"
        print(line, flush=True)


if __name__ == "__main__":
    main()

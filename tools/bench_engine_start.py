"""Seconds to build a tensor-parallel engine, several times in one process (the first pays the imports).

    python tools/bench_engine_start.py [--tensor-parallel-size 2] [--builds 3]

On a tiny random Qwen3 checkpoint, on whatever device the engine picks; prints each build's seconds and those of a
short greedy generate with the engine's exit.
"""
import argparse
import tempfile
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.testing import TINY, TINY_MODELS, make_random_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--builds", type=int, default=3)
    args = parser.parse_args()
    architecture, overrides = TINY_MODELS["qwen3"]
    with tempfile.TemporaryDirectory() as folder:
        path = make_random_checkpoint(folder, architecture, dtype=torch.float32, **{**TINY, **overrides})
        for build in range(1, args.builds + 1):
            start = time.perf_counter()
            with LLM(path, tensor_parallel_size=args.tensor_parallel_size, max_model_len=128) as llm:
                built = time.perf_counter()
                llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
            print(f"build {build}: {built - start:.2f} s, generate and exit {time.perf_counter() - built:.2f} s",
                  flush=True)


if __name__ == "__main__":
    main()

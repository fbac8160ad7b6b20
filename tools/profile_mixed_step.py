"""What a prompt chunk adds to a decode step, kernel by kernel.

    python tools/profile_mixed_step.py [--model PATH] [--chunk 128] [--top 12]

Seven short requests (128-token prompts) decode while a 7,000-token prompt is computed --chunk tokens a step
(long_prefill_token_threshold), as in tools/bench_latency.py. Ten steps are wrapped in torch.profiler once the
prompt is past 5,000 tokens, then ten decode-only steps of the same requests. For each: the kernels' own GPU time
per step and the costliest kernels with their time and launches per step.
"""
import argparse
import os
import random
import tempfile

import torch
from profile_kernels import print_kernels, profiled_steps


def profile(llm, steps: int, label: str, top: int):
    kernels, total = profiled_steps(llm, steps)
    print(f"\n{label}: kernels {total:.3f} ms/step")
    print_kernels(kernels, steps, top)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: Qwen3-0.6B shape, random weights)")
    parser.add_argument("--chunk", type=int, default=128, help="prompt tokens a step (long_prefill_token_threshold)")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    from nanovllm import LLM, SamplingParams
    from nanovllm.testing import QWEN3_0_6B, make_random_checkpoint
    rng = random.Random(0)
    print(torch.cuda.get_device_name(0))
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or make_random_checkpoint(os.path.join(folder, "m"), dtype=torch.bfloat16, **QWEN3_0_6B)
        llm = LLM(model, max_model_len=8192, long_prefill_token_threshold=args.chunk)
        for timed in (False, True):  # the first round compiles and warms up
            short = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
            for _ in range(7):
                llm.add_request([rng.randint(0, 10000) for _ in range(128)], short)
            for _ in range(3):
                llm.step()
            llm.add_request([rng.randint(0, 10000) for _ in range(7000)],
                            SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
            for _ in range(5000 // args.chunk):
                llm.step()
            if timed:
                profile(llm, 10, f"steps with a {args.chunk}-token chunk past 5,000 of 7,000 tokens + 7 decodes",
                        args.top)
            while any(seq.num_uncomputed_tokens > 1 for seq in llm.scheduler.running):
                llm.step()
            for _ in range(8):
                llm.step()
            if timed:
                profile(llm, 10, "decode-only steps of the 7 short requests", args.top)
            while not llm.is_finished():
                llm.step()
        llm.exit()


if __name__ == "__main__":
    main()

"""Where a throughput run's GPU time goes, kernel by kernel, in windows of steps.

    python tools/profile_kernels.py [--model PATH] [--windows 0:9 60:20 500:20 950:20] [--top 25]

Runs upstream nano-vllm's bench workload in one engine (async scheduling, as the benchmark) and wraps each
window START:STEPS of engine steps in torch.profiler (CUDA activity: kernels replayed from CUDA graphs are listed
one by one). For each window: the running batch and its mean length, the kernels' own GPU time per step, the time
between CUDA events around the model per step (kernels plus the gaps between them, without the sampler), and the
costliest kernels with their time and launches per step. The first 9 steps of the workload are its prompts.
"""
import argparse
import os
import tempfile

import torch
from profile_steps import engine_with_workload, time_calls


def profiled_steps(llm, steps: int) -> tuple[list, float]:
    """Run ``steps`` engine steps under torch.profiler (CUDA activity: kernels replayed from CUDA graphs are listed
    one by one); their kernels, costliest first, and the kernels' own GPU milliseconds per step."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            llm.step()
        torch.cuda.synchronize()
    kernels = sorted(profiler.key_averages(), key=lambda e: -e.self_device_time_total)
    return kernels, sum(e.self_device_time_total for e in kernels) / steps / 1000


def print_kernels(kernels: list, steps: int, top: int):
    """The ``top`` costliest kernels with their GPU time and launches per step."""
    for e in kernels[:top]:
        print(f"{e.self_device_time_total / steps:9.1f} us/step {e.count / steps:6.1f}/step  {e.key[:100]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--windows", nargs="+", default=["0:9", "60:20", "500:20", "950:20"], metavar="START:STEPS")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    from nanovllm.cli.bench import make_workload
    from nanovllm.testing import QWEN3_0_6B, make_random_checkpoint
    windows = dict(tuple(int(v) for v in window.split(":")) for window in args.windows)
    prompts, params = make_workload(256, (100, 1024), (100, 1024))
    print(torch.cuda.get_device_name(0))
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or make_random_checkpoint(os.path.join(folder, "m"), dtype=torch.bfloat16, **QWEN3_0_6B)
        llm = engine_with_workload(model, prompts, params)
        events = []
        time_calls(llm.model_runner, "run_model", events)
        step = 0
        while not llm.is_finished():
            steps = windows.get(step)
            if steps is None:
                llm.step()
                step += 1
                continue
            torch.cuda.synchronize()
            running = llm.scheduler.running
            batch, mean_len = len(running), sum(len(seq) for seq in running) / max(len(running), 1)
            events.clear()
            kernels, total = profiled_steps(llm, steps)
            between = sum(begin.elapsed_time(end) for _, _, begin, end in events) / steps
            print(f"\nsteps {step}-{step + steps - 1}: batch {batch}, mean length {mean_len:.0f}; kernels {total:.3f} "
                  f"ms/step, between events around the model {between:.3f} ms/step")
            print_kernels(kernels, steps, args.top)
            step += steps
        llm.exit()


if __name__ == "__main__":
    main()

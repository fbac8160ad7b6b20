"""Where a throughput run's time goes: GPU time of the model per step against each step's wall time.

    python tools/profile_steps.py [--model PATH] [--num-seqs 256]

Runs upstream nano-vllm's bench workload with CUDA events around every model call and prints, for
prefill and decode steps separately: steps, wall seconds, seconds between the events (the GPU busy
with the model), and the CPU time per step outside them (scheduling, input preparation, sampling).
"""
import argparse
import os
import tempfile
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--num-seqs", type=int, default=256)
    args = parser.parse_args()
    from nanovllm import LLM, SamplingParams
    from nanovllm.bench import make_workload
    from nanovllm.random_checkpoint import QWEN3_0_6B, make_random_checkpoint
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or make_random_checkpoint(os.path.join(folder, "m"), dtype=torch.bfloat16, **QWEN3_0_6B)
        llm = LLM(model, max_model_len=4096)
        prompts, params = make_workload(args.num_seqs, (100, 1024), (100, 1024))
        llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
        runner = llm.model_runner
        run_model, events = runner.run_model, []

        def timed_run_model(inputs):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            logits = run_model(inputs)
            end.record()
            events.append((begin, end, inputs.is_decode))
            return logits
        runner.run_model = timed_run_model
        for prompt, sp in zip(prompts, params):
            llm.add_request(prompt, sp)
        stats = {"prefill": [0, 0.0, 0.0], "decode": [0, 0.0, 0.0]}
        start = time.perf_counter()
        while not llm.is_finished():
            step_start = time.perf_counter()
            llm.step()
            wall = time.perf_counter() - step_start
            begin, end, is_decode = events.pop()
            kind = "decode" if is_decode else "prefill"
            stats[kind][0] += 1
            stats[kind][1] += wall
            stats[kind][2] += begin.elapsed_time(end) / 1000
        total = time.perf_counter() - start
        llm.exit()
    print(f"{torch.cuda.get_device_name(0)}: {total:.2f} s in all")
    for kind, (steps, wall, gpu) in stats.items():
        if steps:
            print(f"{kind:>8}: {steps} steps, {wall:.2f} s wall, {gpu:.2f} s between events around the model "
                  f"({gpu / wall:.0%} busy), CPU outside {1000 * (wall - gpu) / steps:.2f} ms/step")


if __name__ == "__main__":
    main()

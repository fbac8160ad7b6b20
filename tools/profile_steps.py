"""Where a throughput run's time goes: GPU time of the model against wall time, per step kind.

    python tools/profile_steps.py [--model PATH] [--num-seqs 256]

Runs upstream nano-vllm's bench workload twice, with synchronous and with async scheduling, with
CUDA events around every model call. For each run and step kind (prefill, decode) it prints the
steps, the seconds between the events (the GPU busy with the model) and the share of the run's
wall time they fill; the synchronous run also gives the CPU time per step outside the model
(scheduling, input preparation, sampling), which async scheduling hides behind the GPU. Then, in one more engine
(async), the workload twice with CUDA events around each step's launches: per run, the GPU's idle time before steps,
the steps it waited longest before, and the CUDA memory segments allocated during the run, so that what only a
first run pays shows beside what every run pays. (CUDA events, not torch.profiler: on an H100 a run under the profiler
showed the GPU idle for up to 18 ms at a time, where CUDA events before each step found at most 2.4 ms in two runs
without it: benchmarks/RESULTS.md.)
"""
import argparse
import os
import tempfile
import time

import torch


def time_calls(runner, method: str, calls: list):
    """Wrap ``runner``'s ``method`` (run_model: the model; execute: the step's launches, sampling included) so that
    each call appends (step kind, tokens, CUDA event before, CUDA event after)."""
    call = getattr(runner, method)

    def timed(inputs):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        result = call(inputs)
        end.record()
        calls.append(("decode" if inputs.is_decode else "prefill", len(inputs.positions), begin, end))
        return result
    setattr(runner, method, timed)


def engine_with_workload(model, prompts, params, async_scheduling=True):
    """An engine warmed up with one short prompt, with the workload's requests added."""
    from nanovllm import LLM, SamplingParams
    llm = LLM(model, max_model_len=4096, async_scheduling=async_scheduling)
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    add_workload(llm, prompts, params)
    return llm


def add_workload(llm, prompts, params):
    for prompt, sp in zip(prompts, params):
        llm.add_request(prompt, sp)


def run_to_end(llm):
    while not llm.is_finished():
        llm.step()
    torch.cuda.synchronize()


def profile(model, prompts, params, async_scheduling):
    llm = engine_with_workload(model, prompts, params, async_scheduling)
    events = []
    time_calls(llm.model_runner, "run_model", events)
    start = time.perf_counter()
    run_to_end(llm)
    wall = time.perf_counter() - start
    llm.exit()
    stats = {}
    for kind, _, begin, end in events:
        steps, gpu = stats.get(kind, (0, 0.0))
        stats[kind] = (steps + 1, gpu + begin.elapsed_time(end) / 1000)
    return wall, stats


def waits(llm, prompts, params, runs=2):
    """The workload ``runs`` times in ``llm`` (its first run already added); per run: wall seconds, the GPU's idle
    milliseconds before each step as (ms, step, kind, tokens), and the CUDA memory segments allocated (cudaMalloc
    calls) during it."""
    steps, results = [], []
    time_calls(llm.model_runner, "execute", steps)
    for run in range(runs):
        if run:
            add_workload(llm, prompts, params)
        steps.clear()
        segments = torch.cuda.memory_stats().get("num_device_alloc", 0)
        start = time.perf_counter()
        run_to_end(llm)
        wall = time.perf_counter() - start
        idle = [(max(0.0, steps[i - 1][3].elapsed_time(begin)), i, kind, tokens)
                for i, (kind, tokens, begin, _) in enumerate(steps) if i]
        results.append((wall, idle, torch.cuda.memory_stats().get("num_device_alloc", 0) - segments))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--num-seqs", type=int, default=256)
    args = parser.parse_args()
    from nanovllm.cli.bench import make_workload
    from nanovllm.testing import QWEN3_0_6B, make_random_checkpoint
    prompts, params = make_workload(args.num_seqs, (100, 1024), (100, 1024))
    print(torch.cuda.get_device_name(0))
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or make_random_checkpoint(os.path.join(folder, "m"), dtype=torch.bfloat16, **QWEN3_0_6B)
        for async_scheduling in (False, True):
            wall, stats = profile(model, prompts, params, async_scheduling)
            gpu_total = sum(gpu for _, gpu in stats.values())
            steps_total = sum(steps for steps, _ in stats.values())
            name = "async" if async_scheduling else "sync"
            print(f"{name:>6}: {wall:.2f} s wall, GPU busy with the model {gpu_total / wall:.0%}"
                  + ("" if async_scheduling else f", CPU outside the model {1000 * (wall - gpu_total) / steps_total:.2f} ms/step"))
            for kind, (steps, gpu) in stats.items():
                print(f"{kind:>14}: {steps} steps, {gpu:.2f} s between events around the model")
        llm = engine_with_workload(model, prompts, params)
        for run, (wall, idle, segments) in enumerate(waits(llm, prompts, params), 1):
            long = sorted((wait for wait in idle if wait[0] > 1), reverse=True)
            print(f"run {run} of one engine: {wall:.2f} s wall, GPU idle before steps "
                  f"{sum(wait[0] for wait in idle) / 1e3:.3f} s, {sum(wait[0] for wait in long) / 1e3:.3f} s of it in "
                  f"{len(long)} waits over 1 ms; {segments} CUDA memory segments allocated; longest waits: "
                  + ", ".join(f"{ms:.1f} ms before step {step} ({kind}, {tokens} tokens)"
                              for ms, step, kind, tokens in long[:8]))
        llm.exit()


if __name__ == "__main__":
    main()

"""Latency with chunked prefill on and off: short requests arriving among long ones.

    python tools/bench_latency.py [--model PATH] [--json FILE]

Requests arrive on a fixed wall-clock schedule: a short one (128-token prompt, 64 output tokens)
every 25 ms and a long one (7,000-token prompt, 16 output tokens) every 250 ms, 64 short and 8 long
in all. For each setting it prints time to first token (TTFT) and inter-token latency (ITL) p50 and
p99 of the short requests, which a long prefill stalls unless it is chunked: the median over
--repeats runs of the schedule, after one warm-up run.
"""
import argparse
import json
import os
import random
import tempfile
import time

import numpy as np

SETTINGS = {"chunked prefill on": dict(enable_chunked_prefill=True, max_num_batched_tokens=2048),
            "chunked prefill off": dict(enable_chunked_prefill=False, max_num_batched_tokens=8192)}


def arrivals(seed=0):
    rng = random.Random(seed)
    short = [(i * 0.025, [rng.randint(0, 10000) for _ in range(128)], 64) for i in range(64)]
    long = [(i * 0.25, [rng.randint(0, 10000) for _ in range(7000)], 16) for i in range(8)]
    return sorted(short + long, key=lambda a: a[0])


def run_schedule(llm):
    """Feed the arrivals on their wall-clock schedule; TTFT and ITL of the short requests, in seconds."""
    from nanovllm import SamplingParams
    pending = arrivals()
    tracked = []  # (seq, arrival time, is_short, token times)
    start = time.perf_counter()
    while pending or not llm.is_finished():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            at, prompt, max_tokens = pending.pop(0)
            seq = llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
            tracked.append((seq, at, len(prompt) < 1000, []))
        if llm.is_finished():
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        llm.step()
        now = time.perf_counter() - start
        for seq, _, _, times in tracked:
            times.extend([now] * (seq.num_completion_tokens - len(times)))
    ttft = [times[0] - at for _, at, short, times in tracked if short]
    itl = [b - a for _, _, short, times in tracked if short for a, b in zip(times, times[1:])]
    return ttft, itl


def measure(model, options, repeats):
    """Run the schedule once to warm up, then ``repeats`` times; the median of each run's percentiles."""
    from nanovllm import LLM
    llm = LLM(model, max_model_len=8192, **options)
    run_schedule(llm)
    runs = []
    for _ in range(repeats):
        ttft, itl = run_schedule(llm)
        runs.append([np.percentile(ttft, 50), np.percentile(ttft, 99), np.percentile(itl, 50), np.percentile(itl, 99)])
    llm.exit()
    medians = np.median(np.array(runs) * 1000, axis=0)
    return dict(zip(["ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"], map(float, medians)),
                runs_ms=(np.array(runs) * 1000).round(1).tolist())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: Qwen3-0.6B shape, random weights)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting, after one warm-up run")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import torch
    from nanovllm.testing import QWEN3_0_6B, make_random_checkpoint
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or make_random_checkpoint(os.path.join(folder, "m"), dtype=torch.bfloat16, **QWEN3_0_6B)
        results = {name: measure(model, options, args.repeats) for name, options in SETTINGS.items()}
    for name, r in results.items():
        print(f"{name:>20} ({SETTINGS[name]['max_num_batched_tokens']} tokens/step): TTFT p50 {r['ttft_p50_ms']:.1f} ms, "
              f"p99 {r['ttft_p99_ms']:.1f} ms; ITL p50 {r['itl_p50_ms']:.1f} ms, p99 {r['itl_p99_ms']:.1f} ms")
    print(f"SUMMARY {device}: " + json.dumps(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, **results}, f, indent=2)


if __name__ == "__main__":
    main()

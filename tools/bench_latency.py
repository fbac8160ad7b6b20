"""Latency with chunked prefill on and off: short requests arriving among long ones, and alone.

    python tools/bench_latency.py [--model PATH] [--json FILE]

Requests arrive on a fixed wall-clock schedule: a short one (128-token prompt, 64 output tokens)
every 25 ms and a long one (7,000-token prompt, 16 output tokens) every 250 ms, 64 short and 8 long
in all. For each setting it prints time to first token (TTFT) and inter-token latency (ITL) p50 and
p99 of the short requests, which a long prefill stalls unless it is chunked (and, with
long_prefill_token_threshold, computed a few hundred tokens per step): the median over
--repeats runs of the schedule, after one warm-up run, each run with new random prompts (so that none
is served from the prefix cache). "short alone" runs the short requests
without the long ones: the latency to compare with. The 256- and 128-tokens-a-step settings bound every step, as
vLLM users lower max_num_batched_tokens for inter-token latency: a long prompt's chunk, a short prompt and the decodes
share one CUDA graph of that many tokens. Per setting it also prints where the steps'
time goes: wall time per step by kind (decode only, or carrying prefill tokens) with the GPU time
of the model inside it, the slowest steps' make-up, how many engine steps the slowest ITLs spanned,
Python's garbage-collector pauses, and graphs torch.compile made during timed runs.
"""
import argparse
import collections
import gc
import json
import os
import random
import tempfile
import time

import numpy as np
import torch
from profile_steps import time_calls

MAX_MODEL_LEN = 8192  # the long prompts' 7,000 tokens and their outputs
SETTINGS = {"short alone": (dict(enable_chunked_prefill=True, max_num_batched_tokens=2048), False),
            "chunked prefill on": (dict(enable_chunked_prefill=True, max_num_batched_tokens=2048), True),
            **{f"chunked on, prompts capped at {cap}": (dict(enable_chunked_prefill=True, max_num_batched_tokens=2048,
                                                              long_prefill_token_threshold=cap), True)
               for cap in (256, 128, 64)},
            **{f"chunked on, 256 tokens/step, prompts capped at {cap}": (
                dict(enable_chunked_prefill=True, max_num_batched_tokens=256, max_num_seqs=256,
                     long_prefill_token_threshold=cap), True) for cap in (128, 64)},
            "chunked on, 128 tokens/step, prompts capped at 128": (
                dict(enable_chunked_prefill=True, max_num_batched_tokens=128, max_num_seqs=128,
                     long_prefill_token_threshold=128), True),
            "chunked prefill off": (dict(enable_chunked_prefill=False, max_num_batched_tokens=8192), True)}


def arrivals(with_long: bool, seed=0):
    rng = random.Random(seed)
    short = [(i * 0.025, [rng.randint(0, 10000) for _ in range(128)], 64) for i in range(64)]
    long = [(i * 0.25, [rng.randint(0, 10000) for _ in range(7000)], 16) for i in range(8)]
    return sorted(short + (long if with_long else []), key=lambda a: a[0])


class StepLog:
    """Wall time of each engine step with its prefill and decode tokens, and the GPU time of the model calls it
    launched (one rank in this process only)."""

    def __init__(self, llm):
        self.steps, self.events = [], []  # steps: (wall seconds, prefill tokens, decode tokens, events before it)
        runner = getattr(llm, "model_runner", None)
        if torch.cuda.is_available() and hasattr(runner, "run_model"):  # one rank here: time its model calls on the GPU
            time_calls(runner, "run_model", self.events)

    def gpu_ms(self) -> list[float]:
        """Per step, the GPU milliseconds of its model calls (nan when they were not timed)."""
        if not self.events:
            return [float("nan")] * len(self.steps)
        torch.cuda.synchronize()
        bounds = [s[3] for s in self.steps] + [len(self.events)]
        return [sum(b.elapsed_time(e) for _, _, b, e in self.events[first:last])
                for first, last in zip(bounds, bounds[1:])]


def run_schedule(llm, with_long: bool, log: StepLog | None = None, seed: int = 0):
    """Feed the arrivals on their wall-clock schedule; TTFT and ITL of the short requests and TTFT of the long ones
    (what a smaller chunk a step costs them), in seconds."""
    from nanovllm import SamplingParams
    pending = arrivals(with_long, seed)
    tracked = []  # (seq, arrival time, is_short, [(token time, engine step it came with)])
    start, step_index = time.perf_counter(), 0
    while pending or not llm.is_finished():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            at, prompt, max_tokens = pending.pop(0)
            seq = llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
            tracked.append((seq, at, len(prompt) < 1000, []))
        if llm.is_finished():
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        before, num_events = time.perf_counter() - start, len(log.events) if log else 0
        _, num_prefill, num_decode = llm.step()
        now = time.perf_counter() - start
        if log is not None:
            log.steps.append((now - before, num_prefill, num_decode, num_events))
        for seq, _, _, times in tracked:
            times.extend([(now, step_index)] * (seq.num_completion_tokens - len(times)))
        step_index += 1
    ttft = [times[0][0] - at for _, at, short, times in tracked if short]
    long_ttft = [times[0][0] - at for _, at, short, times in tracked if not short]
    # each gap between a short request's tokens, with the engine steps it spans
    itl = [(b - a, b_step - a_step) for _, _, short, times in tracked if short
           for (a, a_step), (b, b_step) in zip(times, times[1:])]
    return ttft, itl, long_ttft


def measure(model, options, with_long, repeats):
    """Run the schedule once to warm up, then ``repeats`` times; the median of each run's percentiles."""
    from torch._dynamo.utils import counters
    from nanovllm import LLM
    llm = LLM(model, max_model_len=MAX_MODEL_LEN, **options)
    run_schedule(llm, with_long)
    graphs_before = counters["stats"]["unique_graphs"]
    runs, log, slow_gaps, pauses = [], StepLog(llm), [], GCPauses()
    for run in range(1, repeats + 1):  # new prompts each run: none comes from the prefix cache
        ttft, itl, long_ttft = run_schedule(llm, with_long, log, seed=run)
        gaps = np.array([gap for gap, _ in itl])
        runs.append([np.percentile(ttft, 50), np.percentile(ttft, 99), np.percentile(gaps, 50), np.percentile(gaps, 99),
                     np.percentile(long_ttft, 50) if long_ttft else np.nan])
        slow_gaps += [num_steps for gap, num_steps in itl if gap >= runs[-1][3]]
    pauses.stop()
    gpu_ms = log.gpu_ms()
    llm.exit()
    medians = np.median(np.array(runs) * 1000, axis=0)
    return dict(zip(["ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "long_ttft_p50_ms"],
                    map(float, medians)),
                runs_ms=(np.array(runs) * 1000).round(1).tolist(),
                new_compiled_graphs=counters["stats"]["unique_graphs"] - graphs_before,
                # how many engine steps each ITL at or above its run's p99 spanned: 1 is one slow step
                slow_itl_steps=dict(sorted(collections.Counter(slow_gaps).items())),
                gc_pauses=pauses.summary(), steps=step_profile(log.steps, gpu_ms))


class GCPauses:
    """Python's garbage-collector pauses from now until stop(): count, total and longest, by generation."""

    def __init__(self):
        self.pauses, self._started = [], None
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict):
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    def stop(self):
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        return {f"gen{g}": dict(count=len(ms), total_ms=round(sum(ms), 1), max_ms=round(max(ms), 1))
                for g in range(3) if (ms := [p * 1000 for gen, p in self.pauses if gen == g])}


def step_profile(steps: list[tuple], gpu_ms: list[float]) -> dict:
    """Per step kind: count, wall ms p50/p99/max, GPU ms of the model p50/p99; and the slowest steps. With async
    scheduling a step's wall time also covers waiting for the previous step's tokens."""
    rows = [(wall * 1000, prefill, decode, g) for (wall, prefill, decode, _), g in zip(steps, gpu_ms)]
    profile = {}
    for kind, chosen in (("decode only", [r for r in rows if not r[1]]), ("with prefill", [r for r in rows if r[1]])):
        if chosen:
            wall, g = np.array([r[0] for r in chosen]), np.array([r[3] for r in chosen])
            profile[kind] = dict(steps=len(chosen), wall_p50_ms=float(np.percentile(wall, 50)),
                                 wall_p99_ms=float(np.percentile(wall, 99)), wall_max_ms=float(wall.max()),
                                 gpu_p50_ms=float(np.percentile(g, 50)), gpu_p99_ms=float(np.percentile(g, 99)))
    profile["slowest"] = [dict(wall_ms=round(w, 1), prefill_tokens=p, decode_tokens=d, gpu_ms=round(g, 1))
                          for w, p, d, g in sorted(rows, reverse=True)[:8]]
    return profile


def print_result(name: str, r: dict):
    print(f"{name:>33} ({SETTINGS[name][0]['max_num_batched_tokens']} tokens/step): TTFT p50 "
          f"{r['ttft_p50_ms']:.1f} ms, p99 {r['ttft_p99_ms']:.1f} ms; ITL p50 {r['itl_p50_ms']:.1f} ms, "
          f"p99 {r['itl_p99_ms']:.1f} ms; long prompts' TTFT p50 {r['long_ttft_p50_ms']:.0f} ms; graphs compiled "
          f"in timed runs: {r['new_compiled_graphs']}")
    print(f"{'':>33}ITLs at or above p99, by engine steps spanned: {r['slow_itl_steps']}; GC pauses: "
          f"{r['gc_pauses']}")
    for kind, p in r["steps"].items():
        if kind != "slowest":
            print(f"{'':>33}{kind}: {p['steps']} steps, wall p50 {p['wall_p50_ms']:.1f} p99 "
                  f"{p['wall_p99_ms']:.1f} max {p['wall_max_ms']:.1f} ms; model on GPU p50 {p['gpu_p50_ms']:.1f} "
                  f"p99 {p['gpu_p99_ms']:.1f} ms")
    print(f"{'':>33}slowest: {r['steps']['slowest']}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: Qwen3-0.6B shape, random weights)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting, after one warm-up run")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS), metavar="NAME",
                        help=f"run only these settings (default: all of {', '.join(map(repr, SETTINGS))})")
    args = parser.parse_args()
    from nanovllm.config import Config
    from nanovllm.testing import QWEN3_0_6B, make_random_checkpoint
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    chosen = {name: setting for name, setting in SETTINGS.items() if name in args.settings}
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or make_random_checkpoint(os.path.join(folder, "m"), dtype=torch.bfloat16, **QWEN3_0_6B)
        for options, _ in chosen.values():  # a setting the engine refuses fails here, before the others ran
            Config.from_options(model, max_model_len=MAX_MODEL_LEN, **options)
        for name, (options, with_long) in chosen.items():  # each printed once measured
            results[name] = measure(model, options, with_long, args.repeats)
            print_result(name, results[name])
    print(f"SUMMARY {device}: " + json.dumps(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, **results}, f, indent=2)


if __name__ == "__main__":
    main()

"""SnapKV beside full KV on long prompts, in one run: decode tok/s, KV blocks per sequence, the most sequences
running at once under one KV budget, and SnapKV's share of prefill time.

    python tools/bench_snapkv.py [--lengths 8192 16384 32768] [--batches 1 16 64] [--limit 2048] [--json FILE]

Qwen3-0.6B shape with random weights (made locally), random prompts, greedy, ``ignore_eos``. Each setting
(SnapKV off, on) is one engine with the same KV budget (``--kv-gib``), synchronous scheduling so each step's
time is its own; decode tok/s counts steps with no prefill in them. SnapKV's time is the GPU time between CUDA
events around each layer's compaction (scoring, selection and the gather), against the time of the steps
that hold prefill.
"""
import argparse
import json
import os
import random
import tempfile
import time

import torch


def run_setting(model, lengths, batches, output_len, kv_gib, **options):
    from nanovllm import LLM, SamplingParams
    from nanovllm.engine.kv_compaction import KVCompaction
    events = []
    apply = KVCompaction.apply

    def timed_apply(self, *args):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        apply(self, *args)
        end.record()
        events.append((begin, end))
    KVCompaction.apply = timed_apply
    llm = LLM(model, max_model_len=max(lengths) + output_len, kv_cache_memory_gib=kv_gib, async_scheduling=False,
              **options)
    scheduler, rows = llm.scheduler, []
    rng = random.Random(0)
    try:
        for length in lengths:
            for batch in batches:
                events.clear()
                params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
                for _ in range(batch):
                    llm.add_request([rng.randrange(10000) for _ in range(length)], params)
                prefill_s = decode_s = 0.0
                decode_tokens = most_running = 0
                blocks = []
                while not llm.is_finished():
                    start = time.perf_counter()
                    _, num_prefill, num_decode = llm.step()
                    elapsed = time.perf_counter() - start
                    most_running = max(most_running, len(scheduler.running))
                    if num_prefill:
                        prefill_s += elapsed
                    else:
                        decode_s += elapsed
                        decode_tokens += num_decode
                        blocks += [len(seq.block_table) for seq in scheduler.running]
                torch.cuda.synchronize()
                compaction_s = sum(begin.elapsed_time(end) for begin, end in events) / 1000
                rows.append(dict(length=length, batch=batch, decode_tok_s=decode_tokens / decode_s,
                                 blocks_per_seq=sum(blocks) / len(blocks), most_running=most_running,
                                 prefill_s=prefill_s, compaction_s=compaction_s,
                                 compaction_share=compaction_s / prefill_s))
                print(json.dumps(rows[-1]), flush=True)
        return dict(num_kvcache_blocks=llm.model_runner.num_kvcache_blocks, rows=rows)
    finally:
        llm.exit()
        KVCompaction.apply = apply


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: Qwen3-0.6B shape, random weights)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--limit", type=int, default=2048, help="snapkv_limit")
    parser.add_argument("--kv-gib", type=float, default=60.0, help="the KV budget of both settings")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args()
    from nanovllm.testing import QWEN3_0_6B, make_random_checkpoint
    summary = dict(device=torch.cuda.get_device_name(0), limit=args.limit, output_len=args.output_len,
                   kv_gib=args.kv_gib)
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or make_random_checkpoint(os.path.join(folder, "qwen3-0.6b-random"), "Qwen3ForCausalLM",
                                                     dtype=torch.bfloat16, **QWEN3_0_6B)
        for name, options in (("full", {}), ("snapkv", dict(enable_snapkv=True, snapkv_limit=args.limit))):
            print(f"--- {name}", flush=True)
            summary[name] = run_setting(model, args.lengths, args.batches, args.output_len, args.kv_gib, **options)
    print(f"{'length':>6} {'batch':>5} | {'decode tok/s':>21} {'speed-up':>8} | {'blocks/seq':>13} | "
          f"{'most running':>12} | snapkv share of prefill")
    for full, snap in zip(summary["full"]["rows"], summary["snapkv"]["rows"]):
        print(f"{full['length']:>6} {full['batch']:>5} | {full['decode_tok_s']:>9.0f} {snap['decode_tok_s']:>11.0f} "
              f"{snap['decode_tok_s'] / full['decode_tok_s']:>7.2f}x | {full['blocks_per_seq']:>6.1f} "
              f"{snap['blocks_per_seq']:>6.1f} | {full['most_running']:>5} {snap['most_running']:>6} | "
              f"{snap['compaction_share']:.1%}")
    print(f"SUMMARY {summary['device']}: " + json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
